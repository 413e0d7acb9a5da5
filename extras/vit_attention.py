"""Looking inside transformer.py's ViT: where the class token attends, in the last block and through all of them
(attention rollout), drawn over the images. Written after training (vit_attention.png) and by --predict.

The maps are computed from each block's own W_q and W_k and the input its attention received, captured by a
forward pre-hook; MultiHeadSelfAttention.forward is not asked for its weights, so the maps are the same however
it is written (an explicit softmax, F.scaled_dot_product_attention, ...).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

import trainkit
import transformer

ATTENTION_IMAGES = 4  # validation images in the attention picture written after training
ATTENTION_MAX_PREDICT = 8  # --predict draws the maps of at most this many images


def attention_probabilities(x: torch.Tensor, qkv_weight: torch.Tensor, qkv_bias: torch.Tensor | None,
                            n_heads: int) -> torch.Tensor:
    """softmax(Q K^T / sqrt(head_dim)) of each head, (B, heads, N, N), for attention inputs x (B, N, dim).

    qkv_weight (3 dim, dim) stacks W_q, W_k, W_v as nn.MultiheadAttention's in_proj_weight does; V is not
    needed for the weights, so only the first 2 dim rows are used."""
    B, N, D = x.shape
    head_dim = D // n_heads
    bias = qkv_bias[:2 * D] if qkv_bias is not None else None
    q, k = F.linear(x.float(), qkv_weight[:2 * D].float(), bias.float() if bias is not None else None) \
        .view(B, N, 2, n_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, head_dim)
    return (q @ k.transpose(-2, -1) / math.sqrt(head_dim)).softmax(dim=-1)


@torch.no_grad()
def attention_inputs(model: transformer.VisionTransformer, images: torch.Tensor) -> list[torch.Tensor]:
    """What each block's self-attention receives (LN_1 of its input), (B, N+1, dim) per block, from one forward
    pass over normalised images; forward pre-hooks on the attention modules catch it on the way in."""
    captured: list[torch.Tensor] = []

    def catch(module, args, kwargs):
        captured.append((args[0] if args else next(iter(kwargs.values()))).detach().float())

    hooks = [layer.self_attention.register_forward_pre_hook(catch, with_kwargs=True) for layer in model.layers]
    try:
        model.eval()
        model(images)
    finally:
        for hook in hooks:
            hook.remove()
    return captured


@torch.no_grad()
def attention_weights(model: transformer.VisionTransformer, images: torch.Tensor) -> list[torch.Tensor]:
    """The attention probabilities of every block, a list of (B, heads, N+1, N+1); index 0 is the class token."""
    return [attention_probabilities(x, layer.self_attention.qkv.weight, layer.self_attention.qkv.bias,
                                    layer.self_attention.n_heads)
            for x, layer in zip(attention_inputs(model, images), model.layers)]


def attention_rollout(attentions: list[torch.Tensor]) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema, 2020): how much each output token draws on each input token through
    all the blocks. Per block: average the heads, add the identity for the residual connection and renormalise
    each row, A = (mean_h A_h + I) / 2; then multiply the blocks in order, R = A_L ... A_2 A_1. (B, N, N)."""
    n = attentions[0].shape[-1]
    rollout = torch.eye(n, device=attentions[0].device).expand(attentions[0].shape[0], n, n)
    for a in attentions:
        a = a.float().mean(dim=1) + torch.eye(n, device=a.device)
        a = a / a.sum(dim=-1, keepdim=True)
        rollout = a @ rollout
    return rollout


def class_token_maps(model: transformer.VisionTransformer, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Where the class token looks, as (B, grid, grid) maps over the patches: in the last block (heads
    averaged) and through all the blocks (rollout). images: normalised floats, on the model's device."""
    attentions = attention_weights(model, images)
    grid = model.config.image_size // model.config.patch_size
    last = attentions[-1].mean(dim=1)[:, 0, 1:]  # the class token's row, without its weight on itself
    rolled = attention_rollout(attentions)[:, 0, 1:]
    return {"class token, last block": last.reshape(-1, grid, grid).cpu(),
            "attention rollout, all blocks": rolled.reshape(-1, grid, grid).cpu()}


def save_attention_picture(path: Path, model: transformer.VisionTransformer, images: torch.Tensor, titles: list[str],
                           device: torch.device, title: str = "") -> Path:
    """Draws the class token's maps over uint8 images (B, 3, H, W) into a PNG: one row per image."""
    maps = class_token_maps(model, transformer.normalize(images.to(device)))
    title = (title + "; " if title else "") + "bright: where the class token attends most"
    return trainkit.pictures.plot_attention_maps(path, images.cpu(), maps, titles, title)

