"""The exercise graders: what every correct solution of an exercise does, checked against an independent truth,
with a failure message in the exercise's terms.

Each `check_<exercise>(impl)` takes the implementation to grade (a class or a function shaped like the
script's) and raises `Wrong` with a message that says what is wrong: the graded tests (marked with the
exercise, in tests/test_transformer.py, test_llama.py, test_generation.py) call them on the student's code,
and tests/test_grading.py calls them on a battery of correct solutions written in different styles (which
must pass) and of typical mistakes (which must fail, with the right diagnosis).

Where the reference solution makes a choice that other correct solutions make differently (which of several
tokens tied at a boundary to keep, clamping k to the vocabulary, editing the input in place or not), the
check grades only what all of them share; the reference's own choice is tested by an unmarked test.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from make_exercises import EXERCISES  # noqa: E402  (the registry of exercises)


class Wrong(AssertionError):
    """A graded property does not hold; the message says what is wrong, in the exercise's terms."""


def wrong(exercise: str, *lines: str):
    __tracebackhide__ = True
    raise Wrong(f"[{exercise}] " + "\n".join(line for line in lines if line))


# ----------------------------------------------------------------------------------------------------
# Diagnostics shared by the checks


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.double() - expected.double()).abs().max().item()


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float) -> bool:
    if actual.shape != expected.shape:
        return False
    return bool(torch.isclose(actual.double(), expected.double(), rtol=rtol, atol=atol).all())


def likely_cause(actual: torch.Tensor, mistakes: dict[str, torch.Tensor], rtol: float, atol: float) -> str:
    """The first known mistake whose output `actual` equals (up to the tolerance), as a sentence; else ''."""
    for cause, output in mistakes.items():
        if close(actual, output.detach(), rtol, atol):
            return f"likely cause: {cause}"
    return ""


def expect_close(exercise: str, what: str, actual, expected: torch.Tensor, rtol: float, atol: float,
                 mistakes: Optional[dict[str, Callable[[], torch.Tensor]]] = None, extra: str = ""):
    """Fail with the shape, the largest error and the known mistake the output matches, if any."""
    __tracebackhide__ = True
    expected = expected.detach()
    if not isinstance(actual, torch.Tensor):
        wrong(exercise, f"{what}: returned {type(actual).__name__}, expected a tensor of shape {tuple(expected.shape)}")
    actual = actual.detach()
    if actual.shape != expected.shape:
        hint = ""
        if sorted(actual.shape) == sorted(expected.shape):
            hint = "the same sizes in another order: a transpose or permute is missing or one too many"
        wrong(exercise, f"{what}: returned shape {tuple(actual.shape)}, expected {tuple(expected.shape)}", hint)
    if close(actual, expected, rtol, atol):
        return
    if not torch.isfinite(actual).all():
        wrong(exercise, f"{what}: the output holds NaN or inf", extra)
    err = max_error(actual, expected)
    where = tuple(torch.nonzero((actual.double() - expected.double()).abs() == err)[0].tolist())
    cause = likely_cause(actual, {k: f() for k, f in (mistakes or {}).items()}, rtol, atol)
    wrong(exercise, f"{what}: the output differs from the reference by up to {err:.3g} (at index {where}: "
                    f"{actual[where].item():.5g} instead of {expected[where].item():.5g}; tolerance {atol:g} + "
                    f"{rtol:g} x |reference|)", extra, cause)


def expect_input_unchanged(exercise: str, what: str, before: torch.Tensor, after: torch.Tensor, why: str):
    __tracebackhide__ = True
    if not torch.equal(before, after):
        wrong(exercise, f"{what} changed its input in place; {why}")


def expect_same_gradients(exercise: str, what: str, ours: Callable, ref: Callable, x: torch.Tensor,
                          atol: float = 1e-4) -> None:
    """Training works: backward through ours gives the reference's gradient with respect to the input."""
    __tracebackhide__ = True
    r = torch.randn(ref(x).shape, generator=torch.Generator().manual_seed(1))
    x_ref = x.clone().requires_grad_()
    (ref(x_ref) * r).sum().backward()
    x_ours = x.clone().requires_grad_()
    try:
        (ours(x_ours * 1) * r).sum().backward()  # * 1: not a leaf, so editing the input in place is allowed
    except RuntimeError as e:
        hint = ("an in-place operation (+=, *=, .add_(), .mul_()) changed a tensor that autograd needs; use the "
                "out-of-place form (x = x + y, q = q * scale)" if "inplace" in str(e) or "in-place" in str(e) else "")
        wrong(exercise, f"{what}: the forward pass runs without gradients but fails in training: "
                        f"{type(e).__name__}: {str(e).splitlines()[0]}", hint)
    if x_ours.grad is None:
        wrong(exercise, f"{what}: no gradient reaches the input (is the output detached, or built with .data?)")
    if not close(x_ours.grad, x_ref.grad, 1e-4, atol):
        wrong(exercise, f"{what}: the forward output is right but the gradient is not (off by up to "
                        f"{max_error(x_ours.grad, x_ref.grad):.3g}): is part of the computation detached?")


def randomize_(module: nn.Module, std: float = 0.2, seed: int = 0) -> nn.Module:
    """Non-trivial weights everywhere (biases and norms are often initialised to 0 or 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


# ----------------------------------------------------------------------------------------------------
# Day 1: transformer.py


def flattening_mistakes(grid: torch.Tensor, expected: torch.Tensor, bias: torch.Tensor) -> dict:
    """The usual mistakes between self.proj's (B, dim, h, w) grid and the (B, N, dim) tokens, for expect_close."""
    B, D = grid.shape[:2]
    return {
        "the patches come column by column: flatten the grid (H/p, W/p) as it is, without swapping H and W":
            lambda: grid.transpose(2, 3).flatten(2).transpose(1, 2),
        "(B, dim, N) was reshaped to (B, N, dim): that mixes channels and patches; transpose the last two dims":
            lambda: grid.reshape(B, -1, D),
        "the bias of self.proj is missing": lambda: expected - bias,
    }


def check_patch_embedding(PatchEmbedding: type) -> None:
    """PatchEmbedding(patch_size, dim, in_channels) without a stem: (B, C, H, W) -> (B, N, dim), patches in
    row-major order, each flattened and multiplied by the conv kernel (F.unfold and one matrix product are the
    truth)."""
    __tracebackhide__ = True
    torch.manual_seed(0)
    emb = randomize_(PatchEmbedding(patch_size=4, dim=10, in_channels=3))
    images = torch.randn(2, 3, 12, 12)
    patches = F.unfold(images, kernel_size=4, stride=4).transpose(1, 2)  # (B, 9, 3*4*4), rows of patches
    expected = patches @ emb.proj.weight.reshape(10, -1).T + emb.proj.bias
    conv = F.conv2d(images, emb.proj.weight, emb.proj.bias, stride=4)  # (B, dim, 3, 3)
    with torch.no_grad():
        out = emb(images.clone())
    expect_close("patch_embedding", "PatchEmbedding(4, 10, 3) on (2, 3, 12, 12) images", out, expected, 1e-5, 1e-5,
                 flattening_mistakes(conv, expected, emb.proj.bias))
    expect_same_gradients("patch_embedding", "PatchEmbedding(4, 10, 3)", emb, lambda im: F.unfold(
        im, kernel_size=4, stride=4).transpose(1, 2) @ emb.proj.weight.reshape(10, -1).T + emb.proj.bias, images)


def torchvision_conv_stem(stem_channels: tuple[int, ...], dim: int) -> nn.Sequential:
    """torchvision's conv_proj for conv_stem_configs (per entry a Conv2dNormActivation: 3x3 stride-2 Conv2d
    without bias, BatchNorm2d, ReLU; then conv_last, a 1x1 Conv2d), random weights and running statistics."""
    from torchvision.models.vision_transformer import ConvStemConfig, VisionTransformer

    p = 2 ** len(stem_channels)
    ref = VisionTransformer(image_size=p, patch_size=p, num_layers=1, num_heads=1, hidden_dim=dim, mlp_dim=4,
                            conv_stem_configs=[ConvStemConfig(c, kernel_size=3, stride=2) for c in stem_channels])
    ref = randomize_(ref.conv_proj)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for bn in (m for m in ref.modules() if isinstance(m, nn.BatchNorm2d)):  # far from the initial 0 and 1
            bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=g) * 0.5)
            bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=g) + 0.5)
    return ref


def stem_names(tv_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision's conv_proj names -> PatchEmbedding's: conv_bn_relu_{i}.{j} -> stem.{3i + j}, conv_last -> proj."""
    ours = {}
    for name, tensor in tv_state.items():
        block, _, rest = name.partition(".")
        if block == "conv_last":
            ours["proj." + rest] = tensor
        else:
            j, _, rest = rest.partition(".")
            ours[f"stem.{3 * int(block.rsplit('_', 1)[1]) + int(j)}.{rest}"] = tensor
    return ours


def patch_tokens(emb: nn.Module, images: torch.Tensor, what: str) -> torch.Tensor:
    """emb(images); a crash in the forward becomes a diagnosis (a TODO still raises NotImplementedError)."""
    __tracebackhide__ = True
    try:
        return emb(images)
    except NotImplementedError:
        raise
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        hint = ("likely cause: self.proj got the images themselves; with a stem, self.proj is a 1x1 convolution "
                "of the stem's output: apply self.stem first" if "channels" in first else "")
        wrong("patch_embedding", f"{what}: the forward raised {type(e).__name__}: {first}", hint)


def check_patch_embedding_stem(PatchEmbedding: type) -> None:
    """PatchEmbedding(4, 10, 3, stem_channels=(6, 8)): self.stem then self.proj, then the grid flattened to tokens
    in row-major order. The truth is torchvision's conv_proj for the same conv_stem_configs with the same weights,
    followed by torchvision's own (B, dim, h, w) -> (B, N, dim), in eval mode (BatchNorm normalises with its
    running statistics) and in training mode (with the batch's statistics, updating the running ones once)."""
    __tracebackhide__ = True
    torch.manual_seed(0)
    ref = torchvision_conv_stem((6, 8), dim=10)
    emb = PatchEmbedding(patch_size=4, dim=10, in_channels=3, stem_channels=(6, 8))
    emb.load_state_dict(stem_names(ref.state_dict()))
    images = torch.randn(2, 3, 16, 16)
    what = "PatchEmbedding(4, 10, 3, stem_channels=(6, 8)) on (2, 3, 16, 16) images"

    def tokens(grid: torch.Tensor) -> torch.Tensor:  # (B, dim, h, w) -> (B, N, dim): torchvision's _process_input
        return grid.reshape(grid.shape[0], grid.shape[1], -1).permute(0, 2, 1)

    for mode in ("eval", "training"):
        ref.train(mode == "training")
        emb.train(mode == "training")
        with torch.no_grad():
            grid = ref(images)  # (B, dim, 4, 4); in training mode this updates ref's running statistics once
            expected = tokens(grid)
            out = patch_tokens(emb, images.clone(), f"{what} in {mode} mode")
        expect_close("patch_embedding", f"{what} in {mode} mode", out, expected, 1e-4, 1e-5,
                     flattening_mistakes(grid, expected, ref.conv_last.bias))
    runs = {int(m.num_batches_tracked) for m in emb.modules() if isinstance(m, nn.BatchNorm2d)}
    if runs != {1}:
        wrong("patch_embedding", f"{what}: one forward pass in training mode updated the stem's BatchNorm running "
                                 f"statistics {max(runs)} times, not once: apply self.stem once per forward")
    expect_same_gradients("patch_embedding", f"{what} in training mode", emb, lambda im: tokens(ref(im)), images)


def attention_reference(attn: nn.Module, x: torch.Tensor, scale: Optional[float] = None, softmax_dim: int = -1,
                        merge_heads: bool = True, project: bool = True) -> torch.Tensor:
    """softmax(q k^T * scale) v per head with attn's weights, written out; the options make the known mistakes."""
    B, N, D = x.shape
    h = attn.n_heads
    hd = D // h
    q, k, v = F.linear(x, attn.qkv.weight, attn.qkv.bias).view(B, N, 3, h, hd).permute(2, 0, 3, 1, 4)
    scale = hd ** -0.5 if scale is None else scale
    w = torch.softmax(q @ k.transpose(-2, -1) * scale, dim=softmax_dim)
    out = w @ v  # (B, h, N, hd)
    out = out.transpose(1, 2).reshape(B, N, D) if merge_heads else out.reshape(B, N, D)
    return attn.proj(out) if project else out


def attention_probe(MultiHeadSelfAttention: type, n_keys: int = 6, dim: int = 16, n_heads: int = 2):
    """Read the attention weights of head 0 off the module's output: the values of head 0 are one-hot position
    codes, so output row i of head 0 is row i of its attention weights. Returns (weights (N, N), the scale
    that best explains them, q k^T (N, N))."""
    hd = dim // n_heads
    attn = MultiHeadSelfAttention(dim, n_heads).eval()
    g = torch.Generator().manual_seed(3)
    x = torch.zeros(1, n_keys, dim)
    x[0, :, :n_keys] = torch.eye(n_keys)  # channels 0..N-1: the position, one-hot
    x[0, :, n_keys:] = torch.randn(n_keys, dim - n_keys, generator=g)  # the rest: features for q and k
    with torch.no_grad():
        wq = torch.zeros(dim, dim)
        wq[:, n_keys:] = torch.randn(dim, dim - n_keys, generator=g) * 0.3
        wk = torch.zeros(dim, dim)
        wk[:, n_keys:] = torch.randn(dim, dim - n_keys, generator=g) * 0.3
        wv = torch.zeros(dim, dim)
        wv[:n_keys, :n_keys] = torch.eye(n_keys)  # head 0's values: the one-hot positions
        attn.qkv.weight.copy_(torch.cat([wq, wk, wv]))
        attn.qkv.bias.zero_()
        attn.proj.weight.copy_(torch.eye(dim))
        attn.proj.bias.zero_()
        weights = attn(x)[0, :, :n_keys].double()
    q, k = x[0] @ wq.T, x[0] @ wk.T
    raw = (q[:, :hd] @ k[:, :hd].T).double()  # head 0's q k^T, unscaled
    fitted = float("nan")
    if (weights > 0).all():  # log w_ij = scale * raw_ij + c_i: fit the scale on the row-centred values
        lw, r = weights.log(), raw
        lw, r = lw - lw.mean(-1, keepdim=True), r - r.mean(-1, keepdim=True)
        fitted = ((lw * r).sum() / (r * r).sum()).item()
    return weights, fitted, hd


def attention_diagnosis(MultiHeadSelfAttention: type) -> str:
    """Whether each query's weights sum to one and which scale the module applies, as two lines."""
    try:
        weights, scale, hd = attention_probe(MultiHeadSelfAttention)
    except Exception as e:  # the module cannot even run on the probe: the main message says enough
        return f"(could not read the attention weights: {type(e).__name__}: {e})"
    sums = weights.sum(-1)
    lines = [f"read off a module with dim 16, 2 heads (head_dim {hd}), whose values are one-hot positions:"]
    if torch.allclose(sums, torch.ones_like(sums), atol=1e-4):
        lines.append("each query's attention weights sum to 1 (the softmax is over the keys, as it should be)")
    else:
        lines.append(f"each query's attention weights should sum to 1 over the keys; they sum to "
                     f"{[round(s, 3) for s in sums.tolist()]} (softmax over the wrong dim, or no softmax?)")
    if math.isnan(scale):
        lines.append("the scale could not be read (some weights are 0 or negative)")
    else:
        names = {hd ** -0.5: f"1/sqrt(head_dim) = {hd ** -0.5:.4f}", (2 * hd) ** -0.5: "1/sqrt(dim), not head_dim",
                 1.0: "1 (no scaling)", 1 / hd: "1/head_dim, not its square root"}
        best = min(names, key=lambda s: abs(s - scale))
        if abs(best - scale) < 0.02 * best and best == hd ** -0.5:
            lines.append(f"the scores are scaled by {names[best]}, as they should be")
        else:
            what = names[best] if abs(best - scale) < 0.02 * best else "none of 1/sqrt(head_dim), 1/sqrt(dim), 1"
            lines.append(f"the scores are scaled by {scale:.4f}, which is {what}; it should be "
                         f"1/sqrt(head_dim) = {hd ** -0.5:.4f}")
    return "\n".join(lines)


def check_attention(MultiHeadSelfAttention: type) -> None:
    """Against torch's nn.MultiheadAttention with the same weights, in three shapes."""
    __tracebackhide__ = True
    for batch, seq, dim, heads in [(1, 1, 8, 1), (3, 7, 48, 4), (2, 65, 192, 3)]:
        torch.manual_seed(0)
        ours = randomize_(MultiHeadSelfAttention(dim, heads), std=dim ** -0.5).eval()
        ref = nn.MultiheadAttention(dim, heads, batch_first=True).eval()
        with torch.no_grad():  # qkv holds q, k, v stacked exactly like in_proj_weight
            ref.in_proj_weight.copy_(ours.qkv.weight)
            ref.in_proj_bias.copy_(ours.qkv.bias)
            ref.out_proj.weight.copy_(ours.proj.weight)
            ref.out_proj.bias.copy_(ours.proj.bias)
            x = torch.randn(batch, seq, dim)
            expected, _ = ref(x, x, x, need_weights=False)
            out = ours(x.clone())
            mistakes = {
                "the heads were merged without moving them next to each other first: (B, heads, N, head_dim) "
                "needs a transpose to (B, N, heads, head_dim) before the reshape to (B, N, dim)":
                    lambda: attention_reference(ours, x, merge_heads=False),
                "self.proj is not applied to the merged heads": lambda: attention_reference(ours, x, project=False),
                "the softmax is over the queries (dim -2), not the keys": lambda: attention_reference(ours, x, softmax_dim=-2),
                "the scores are divided by sqrt(dim), not sqrt(head_dim)": lambda: attention_reference(ours, x, dim ** -0.5),
                "the scores are not scaled by 1/sqrt(head_dim)": lambda: attention_reference(ours, x, 1.0),
            }
            if heads == 1:
                mistakes.pop("the scores are divided by sqrt(dim), not sqrt(head_dim)")
            if seq == 1:  # one key: every other mistake gives the right output
                mistakes = {k: f for k, f in mistakes.items() if k.startswith("self.proj")}
        if isinstance(out, torch.Tensor) and out.shape == expected.shape and not close(out, expected, 1e-5, 1e-5):
            extra = attention_diagnosis(MultiHeadSelfAttention)
        else:
            extra = ""
        expect_close("attention", f"MultiHeadSelfAttention(dim={dim}, n_heads={heads}) on (B={batch}, N={seq}) "
                                  "against nn.MultiheadAttention", out, expected, 1e-5, 1e-5, mistakes, extra)
        expect_same_gradients("attention", f"MultiHeadSelfAttention(dim={dim}, n_heads={heads})", ours,
                              lambda t: ref(t, t, t, need_weights=False)[0], x)



def check_attention_formula(MultiHeadSelfAttention: type) -> None:
    """One head with identity projections: the output must be softmax(x x^T / sqrt(d)) x, written out by hand."""
    __tracebackhide__ = True
    d = 4
    attn = MultiHeadSelfAttention(d, 1).eval()
    with torch.no_grad():
        attn.qkv.weight.copy_(torch.cat([torch.eye(d)] * 3))
        attn.qkv.bias.zero_()
        attn.proj.weight.copy_(torch.eye(d))
        attn.proj.bias.zero_()
        x = torch.randn(1, 5, d, generator=torch.Generator().manual_seed(0))
        w = torch.exp(x[0] @ x[0].T / math.sqrt(d))
        expected = ((w / w.sum(-1, keepdim=True)) @ x[0])[None]
        out = attn(x.clone())
    extra = attention_diagnosis(MultiHeadSelfAttention) if isinstance(out, torch.Tensor) else ""
    expect_close("attention", "one head, identity projections, against softmax(x x^T / sqrt(d)) x written out",
                 out, expected, 1e-5, 1e-5, extra=extra)

def check_encoder_block(EncoderBlock: type) -> None:
    """Against torchvision's EncoderBlock with the same weights (torch's nn.MultiheadAttention stands in for
    the attention exercise)."""
    __tracebackhide__ = True
    from torchvision.models.vision_transformer import EncoderBlock as TVBlock

    torch.manual_seed(0)
    ref = randomize_(TVBlock(num_heads=4, hidden_dim=48, mlp_dim=96, dropout=0.0, attention_dropout=0.0)).eval()
    ours = EncoderBlock(48, 4, 96).eval()
    with torch.no_grad():
        for name in ("ln_1", "ln_2"):
            getattr(ours, name).load_state_dict(getattr(ref, name).state_dict())
        ours.mlp.fc1.load_state_dict(ref.mlp[0].state_dict())
        ours.mlp.fc2.load_state_dict(ref.mlp[3].state_dict())
    ours.self_attention = TorchSelfAttention(ref.self_attention)
    with torch.no_grad():
        x = torch.randn(3, 17, 48)
        expected = ref(x)
        out = ours(x.clone())
        attn, mlp, ln_1, ln_2 = ours.self_attention, ours.mlp, ours.ln_1, ours.ln_2
        mistakes = {
            "post-norm (LayerNorm after each residual sum, as in the 2017 Transformer): this block normalises "
            "before each sublayer, x + attn(ln_1(x))": lambda: ln_2((h := ln_1(x + attn(x))) + mlp(h)),
            "the attention branch is not added to x (the residual connection is missing)":
                lambda: (h := attn(ln_1(x))) + mlp(ln_2(h)),
            "the MLP branch is not added to its input (the residual connection is missing)":
                lambda: mlp(ln_2(x + attn(ln_1(x)))),
            "the MLP reads the block's input, not x + attention (the two branches run in parallel)":
                lambda: x + attn(ln_1(x)) + mlp(ln_2(x)),
            "ln_1 and ln_2 are swapped": lambda: (h := x + attn(ln_2(x))) + mlp(ln_1(h)),
            "the MLP's input is not normalised with ln_2": lambda: (h := x + attn(ln_1(x))) + mlp(h),
        }
        expect_close("encoder_block", "EncoderBlock(48, 4, 96) against torchvision's EncoderBlock", out, expected,
                     1e-5, 1e-5, mistakes)
    expect_same_gradients("encoder_block", "EncoderBlock(48, 4, 96)", ours, ref, x)


def check_encoder_block_dropout(EncoderBlock: type) -> None:
    """Training with dropout p=1 zeroes both branches, so the block must return its input unchanged."""
    __tracebackhide__ = True
    with torch.no_grad():
        x = torch.randn(3, 17, 48, generator=torch.Generator().manual_seed(0))
        block = EncoderBlock(48, 4, 96, dropout=1.0).train()
        block.self_attention = TorchSelfAttention(nn.MultiheadAttention(48, 4, batch_first=True))
        out = block(x.clone())
    if isinstance(out, torch.Tensor) and not torch.equal(out, x):
        wrong("encoder_block", "with dropout=1.0 in training both branches must be dropped (the block returns x): "
                               "the attention branch needs self.dropout, x + dropout(self_attention(ln_1(x))); "
                               f"the output differs from x by up to {max_error(out, x):.3g}")


class TorchSelfAttention(nn.Module):
    """torch's nn.MultiheadAttention called as self-attention: stands in for ours, so the block is graded
    without the attention exercise."""

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        self.mha = mha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mha(x, x, x, need_weights=False)[0]


# ----------------------------------------------------------------------------------------------------
# Day 2: llama.py


def rms_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def check_rmsnorm(RMSNorm: type) -> None:
    """Against torch.nn.RMSNorm with the same weight, in float32 on two shapes, then in bfloat16."""
    __tracebackhide__ = True
    for shape in [(3, 7, 16), (1, 64)]:
        dim = shape[-1]
        g = torch.Generator().manual_seed(dim)
        ours, ref = RMSNorm(dim, eps=1e-5), nn.RMSNorm(dim, eps=1e-5)
        with torch.no_grad():
            ours.weight.copy_(torch.randn(dim, generator=g))
            ref.weight.copy_(ours.weight)
        x = torch.randn(shape, generator=g) * 3 + 1
        x_in = x.clone()
        with torch.no_grad():
            out = ours(x_in)
            expected = ref(x)
        expect_input_unchanged("rmsnorm", f"RMSNorm({dim})", x, x_in,
                               "the block still needs its input x for the residual sum x + attention(norm(x))")
        w = ref.weight.detach()
        extra = ""
        if isinstance(out, torch.Tensor) and out.shape == expected.shape:
            ratio = (out.double() / expected.double()).flatten()
            lo, hi = ratio.min().item(), ratio.max().item()
            extra = (f"your output / torch.nn.RMSNorm's: between {lo:.4g} and {hi:.4g} (dim = {dim}; a constant "
                     f"factor of 1/sqrt(dim) = {dim ** -0.5:.4g} means a sum was taken instead of a mean)")
        mistakes = {
            f"a sum of x^2 instead of its mean (every output is 1/sqrt(dim) = {dim ** -0.5:.4g} times too small)":
                lambda: x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + 1e-5) * w,
            "the weight is not applied": lambda: rms_reference(x, 1.0, 1e-5),
            "the mean is subtracted first: that is LayerNorm; RMSNorm only divides by the root mean square":
                lambda: rms_reference(x - x.mean(-1, keepdim=True), w, 1e-5),
            "divided by mean(x^2), not by its square root": lambda: x / (x.pow(2).mean(-1, keepdim=True) + 1e-5) * w,
            "the mean is over every dimension, not the last one": lambda: x * torch.rsqrt(x.pow(2).mean() + 1e-5) * w,
            "multiplied by the root mean square instead of dividing by it":
                lambda: x * torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w,
        }
        expect_close("rmsnorm", f"RMSNorm({dim}) on {tuple(shape)} against torch.nn.RMSNorm", out, expected,
                     1e-5, 1e-5, mistakes, extra)
        expect_same_gradients("rmsnorm", f"RMSNorm({dim})", ours, ref, x)


def check_rmsnorm_bf16(RMSNorm: type) -> None:
    """bfloat16 weights and input: the output stays bfloat16 and as close to the float32 truth as bf16 allows
    (with or without computing in float32 inside)."""
    __tracebackhide__ = True
    g = torch.Generator().manual_seed(5)
    ours = RMSNorm(32).bfloat16()
    with torch.no_grad():
        ours.weight.copy_(torch.randn(32, generator=g))
    x = (torch.randn(4, 32, generator=g) * 3 + 1).bfloat16()
    with torch.no_grad():
        out = ours(x)
    if isinstance(out, torch.Tensor) and out.dtype != torch.bfloat16:
        wrong("rmsnorm", f"a bfloat16 RMSNorm on a bfloat16 input returned {out.dtype}; compute in float32 if you like, "
                         "but return the input's dtype (times a bf16 weight stays bf16)")
    x32, w32 = x.float(), ours.weight.float()
    expected = rms_reference(x32, w32, 1e-5)
    mistakes = {
        "a sum of x^2 instead of its mean (every output is 1/sqrt(dim) times too small)":
            lambda: x32 * torch.rsqrt(x32.pow(2).sum(-1, keepdim=True) + 1e-5) * w32,
        "the weight is not applied": lambda: rms_reference(x32, 1.0, 1e-5),
    }
    expect_close("rmsnorm", "a bfloat16 RMSNorm(32) on a bfloat16 input against the float32 formula",
                 out.float() if isinstance(out, torch.Tensor) else out, expected, 2e-2, 2e-2, mistakes)


def check_swiglu(FeedForward: type) -> None:
    """Against Hugging Face's LlamaMLP with the same three matrices."""
    __tracebackhide__ = True
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(0)
    ours = FeedForward(32, 96)
    ref = LlamaMLP(LlamaConfig(hidden_size=32, intermediate_size=96, mlp_bias=False, hidden_act="silu"))
    with torch.no_grad():
        ref.gate_proj.weight.copy_(ours.w1.weight)
        ref.down_proj.weight.copy_(ours.w2.weight)
        ref.up_proj.weight.copy_(ours.w3.weight)
        x = torch.randn(4, 9, 32)
        expected = ref(x)
        out = ours(x.clone())
        w1, w2, w3 = ours.w1, ours.w2, ours.w3
        mistakes = {
            "the SiLU gates w3(x) instead of w1(x) (w1 is the gate, w3 the up projection)":
                lambda: w2(F.silu(w3(x)) * w1(x)),
            "GELU instead of SiLU": lambda: w2(F.gelu(w1(x)) * w3(x)),
            "sigmoid instead of SiLU (SiLU is x * sigmoid(x))": lambda: w2(torch.sigmoid(w1(x)) * w3(x)),
            "no gate: w3(x) is not multiplied in": lambda: w2(F.silu(w1(x))),
            "the SiLU is applied after the product, not to the gate alone": lambda: w2(F.silu(w1(x) * w3(x))),
        }
    expect_close("swiglu", "FeedForward(32, 96) against Hugging Face's LlamaMLP", out, expected, 1e-5, 1e-6, mistakes)
    expect_same_gradients("swiglu", "FeedForward(32, 96)", ours, ref, x)


def mask_violations(mask: torch.Tensor, truth: torch.Tensor, start_pos: int, limit: int = 6) -> list[str]:
    """Each query that sees a future key or is blocked from a past one, in positions (query i = start_pos + i)."""
    lines = []
    for i, j in torch.nonzero(mask != truth).tolist():
        pos = start_pos + i
        if mask[i, j]:
            lines.append(f"query at position {pos} (row {i}) sees the future key {j}")
        else:
            lines.append(f"query at position {pos} (row {i}) is blocked from key {j}, "
                         + ("itself" if j == pos else "in its past"))
    more = len(lines) - limit
    return lines[:limit] + ([f"... and {more} more"] if more > 0 else [])


def check_causal_mask(causal_mask: Callable) -> None:
    """The lower triangle offset by start_pos (torch.tril is the truth), boolean, True where a query may attend;
    and in attention it equals SDPA's own is_causal."""
    __tracebackhide__ = True
    for seqlen, start_pos in [(5, 0), (3, 4), (1, 0), (1, 7), (4, 2)]:
        total = start_pos + seqlen
        truth = torch.ones(total, total).tril().bool()[start_pos:]  # row i: the keys position start_pos+i sees
        call = f"causal_mask({seqlen}, start_pos={start_pos})"
        mask = causal_mask(seqlen, start_pos)
        if not isinstance(mask, torch.Tensor):
            wrong("causal_mask", f"{call} returned {type(mask).__name__}, expected a bool tensor")
        if mask.dtype != torch.bool:
            wrong("causal_mask", f"{call} returned a {mask.dtype} mask; it must be boolean, True where the query may "
                                 "attend (an additive 0/-inf mask works in SDPA but not with the KV cache's padding "
                                 "mask, which is combined with &)")
        if mask.shape != truth.shape:
            hint = ("not offset by start_pos: the keys are the start_pos cached positions plus the new ones"
                    if mask.shape == (seqlen, seqlen) and start_pos else "")
            wrong("causal_mask", f"{call} has shape {tuple(mask.shape)}, expected (seqlen, start_pos + seqlen) = "
                                 f"{tuple(truth.shape)}", hint)
        if not torch.equal(mask, truth):
            hint = ""
            if torch.equal(mask, ~truth) and not truth.all():
                hint = "the mask is inverted: True must mean 'may attend' (the opposite of nn.MultiheadAttention's)"
            elif torch.equal(mask, truth & (torch.arange(total)[None, :] != torch.arange(start_pos, total)[:, None])):
                hint = "every query is blocked from itself: a query sees keys up to and including its own position"
            elif start_pos and torch.equal(mask, torch.ones(seqlen, total).tril().bool()):
                hint = "the triangle starts at key 0: query i sits at position start_pos + i"
            wrong("causal_mask", f"{call} is wrong:", *mask_violations(mask, truth, start_pos), hint)


def check_causal_mask_device(causal_mask: Callable) -> None:
    """The mask is made on the device it is asked for (the tokens' device: a GPU in training). The "meta"
    device stands in for a GPU: tensors there have a shape and a dtype but no data."""
    __tracebackhide__ = True
    mask = causal_mask(4, 2, torch.device("meta"))
    if isinstance(mask, torch.Tensor) and mask.device.type != "meta":
        wrong("causal_mask", f"causal_mask(4, 2, device=meta) returned a mask on {mask.device}: build it on `device` "
                             "(torch.arange(..., device=device)), or attention on a GPU fails with a device mismatch")


def check_causal_mask_in_attention(causal_mask: Callable) -> None:
    """Used as SDPA's attn_mask, the mask gives what SDPA's own is_causal gives."""
    __tracebackhide__ = True
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 6, 8).unbind(0)
    ours = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(6, 0))
    expect_close("causal_mask", "attention with causal_mask(6, 0) against SDPA's is_causal=True", ours,
                 F.scaled_dot_product_attention(q, k, v, is_causal=True), 1.3e-6, 1e-5)


# ----------------------------------------------------------------------------------------------------
# Generation: llama_generation.py


def check_sampling_frequencies(sample_with_temperature: Callable) -> None:
    """The frequencies of 20,000 draws follow softmax(logits / T), one token per row; a -inf logit is never
    drawn."""
    __tracebackhide__ = True
    base = torch.tensor([[2.0, 1.0, 0.0, -1.0, float("-inf")]])
    for temperature in (0.5, 1.0, 2.0):
        logits = base.repeat(20000, 1)
        draws = sample_with_temperature(logits.clone(), temperature, torch.Generator().manual_seed(0))
        call = f"sample_with_temperature(logits, temperature={temperature})"
        if not isinstance(draws, torch.Tensor) or draws.shape != (20000, 1):
            shape = tuple(draws.shape) if isinstance(draws, torch.Tensor) else type(draws).__name__
            wrong("temperature_sampling", f"{call}: returned {shape}, expected one token id per row, (batch, 1) = "
                                          "(20000, 1)")
        if draws.dtype.is_floating_point or draws.min() < 0 or draws.max() > 4:
            wrong("temperature_sampling", f"{call}: expected token ids in 0..4, got {draws.dtype} values from "
                                          f"{draws.min().item()} to {draws.max().item()}")
        freq = torch.bincount(draws.flatten().long(), minlength=5).double() / 20000
        expected = F.softmax(base[0].double() / temperature, -1)
        if freq[4] != 0:
            wrong("temperature_sampling", f"{call}: token 4 has logit -inf (removed) but was drawn "
                                          f"{int(freq[4] * 20000)} times")
        if (freq - expected).abs().max() > 0.015:
            candidates = {
                "the temperature has no effect: it must divide the logits before the softmax (dividing the "
                "probabilities is undone when multinomial normalises them)": F.softmax(base[0].double(), -1),
                "the logits were multiplied by the temperature instead of divided":
                    F.softmax(base[0].double() * temperature, -1),
                "always the most likely token: that is greedy; draw with torch.multinomial":
                    torch.tensor([1.0, 0, 0, 0, 0], dtype=torch.float64),
            }
            cause = next((c for c, f in candidates.items() if (freq - f).abs().max() < 0.015), "")
            wrong("temperature_sampling", f"{call}: the draws do not follow softmax(logits / T):",
                  "token:                " + "".join(f"{t:>8}" for t in range(5)),
                  "drawn frequency:      " + "".join(f"{f:8.3f}" for f in freq.tolist()),
                  "softmax(logits / T):  " + "".join(f"{f:8.3f}" for f in expected.tolist()),
                  cause and f"likely cause: {cause}")


def check_sampling_seeded(sample_with_temperature: Callable) -> None:
    """The same seeded generator gives the same draws, another seed others."""
    __tracebackhide__ = True
    logits = torch.randn(8, 200, generator=torch.Generator().manual_seed(0))
    a = sample_with_temperature(logits.clone(), 1.0, torch.Generator().manual_seed(7))
    b = sample_with_temperature(logits.clone(), 1.0, torch.Generator().manual_seed(7))
    c = sample_with_temperature(logits.clone(), 1.0, torch.Generator().manual_seed(8))
    if not torch.equal(a, b):
        wrong("temperature_sampling", "two generators seeded alike gave different draws: draw with the generator "
                                      "passed in (torch.multinomial(..., generator=generator)), not the global one")
    if torch.equal(a, c):
        wrong("temperature_sampling", "generators seeded 7 and 8 gave the same draws: the draws must come from the "
                                      "generator passed in")


def kept(logits: torch.Tensor) -> torch.Tensor:
    """The tokens a filter kept: those not set to -inf (the lowest finite float is taken as removed too)."""
    return logits > torch.finfo(logits.dtype).min


def _tokens(idx: torch.Tensor, values: torch.Tensor, name: str, limit: int = 8) -> str:
    items = [f"{i} ({name} {values[i].item():.4g})" for i in idx.tolist()[:limit]]
    return ", ".join(items) + (f", ... {len(idx) - limit} more" if len(idx) > limit else "")


def kept_set_problems(ours: torch.Tensor, ref: torch.Tensor, values: torch.Tensor, name: str,
                      need: Optional[torch.Tensor] = None, care: Optional[torch.Tensor] = None) -> list[str]:
    """Rows where `ours` (bool, kept) is not an acceptable kept set, given the reference's `ref` ranked by `values`.

    With t the value of the reference's last kept token: every token above t must be kept, none below t, and of
    those tied with t at least as many as the reference keeps (`need`: how many in all). Tokens outside
    `care` (probabilities too small for float32 to rank them) may go either way."""
    care = torch.ones_like(ours) if care is None else care
    lines = []
    for r in range(ours.shape[0]):
        v, o, rf, c = values[r], ours[r], ref[r], care[r]
        t = v[rf].min()
        must, must_not, tied = (v > t) & c, (v < t) & c, (v == t) & c
        n_need = int((rf & c).sum()) if need is None else int(need[r])
        if n_need - int(must.sum()) >= int(tied.sum()):  # every token tied with the last kept one is needed
            must = must | tied
        missing = torch.nonzero(must & ~o).flatten()
        extra = torch.nonzero(must_not & o).flatten()
        few_tied = int((o & (must | tied)).sum()) < n_need
        if len(missing) or len(extra) or few_tied:
            got = torch.nonzero(o & c).flatten()
            want = torch.nonzero(rf & c).flatten()
            row = [f"row {r}: kept {len(got)} token{'s' * (len(got) != 1)}, expected {n_need}"]
            if len(missing):
                row.append(f"  missing: {_tokens(missing, v, name)}")
            if len(extra):
                row.append(f"  kept but should be removed: {_tokens(extra, v, name)}")
            if few_tied and not len(missing):
                row.append(f"  of the tokens tied at {name} {t.item():.4g} (the last one kept), "
                           f"{int((o & tied).sum())} kept; at least {n_need - int(must.sum())} needed")
            row.append(f"  expected (largest first): {_tokens(want[v[want].argsort(descending=True)], v, name)}")
            lines.append("\n".join(row))
    return lines


def _kept_set_cause(ours: torch.Tensor, ref: torch.Tensor, values: torch.Tensor, exercise: str) -> str:
    n_ours, n_ref = ours.sum(-1), ref.sum(-1)
    if bool((n_ours == n_ref).all()):
        # The right number of tokens, the wrong ones: the mask may still be in sorted order.
        first = torch.arange(ours.shape[-1])[None, :] < n_ref[:, None]
        if torch.equal(ours, first):
            return "likely cause: the kept set is the first n positions: the mask is still in sorted order; " \
                   "scatter it back to each token's own position"
    if bool((n_ours == n_ref - 1).all()) and bool((ours <= ref).all()):
        return ("likely cause: one token too few: " +
                ("keep k tokens, the k-th largest included (compare with <, not <=)" if exercise == "top_k" else
                 "the token whose probability crosses p must stay (keep a token while the mass BEFORE it is < p)"))
    if bool((n_ours == n_ref + 1).all()) and bool((ours >= ref).all()):
        return "likely cause: one token too many"
    return ""


def expect_filter(exercise: str, call: str, logits: torch.Tensor, out, ref_out: torch.Tensor, values: torch.Tensor,
                  name: str, need: Optional[torch.Tensor] = None, care: Optional[torch.Tensor] = None) -> None:
    """The filter's output: same shape, the right kept set, and the kept tokens' distribution unchanged."""
    __tracebackhide__ = True
    if not isinstance(out, torch.Tensor):
        wrong(exercise, f"{call} returned {type(out).__name__}; return the filtered logits (a tensor shaped like "
                        "the input)")
    if out.shape != logits.shape:
        wrong(exercise, f"{call} returned shape {tuple(out.shape)}, expected the logits' shape {tuple(logits.shape)}")
    if torch.isnan(out).any():
        wrong(exercise, f"{call} returned NaN")
    ours, ref = kept(out), kept(ref_out)
    if not bool(ours.any(-1).all()):
        wrong(exercise, f"{call} removed every token of a row (row {int(torch.nonzero(~ours.any(-1))[0])}); "
                        + ("keep the k largest, the k-th included (compare with <, not <=)" if exercise == "top_k" else
                           "the most likely token always stays (the mass before it is 0, which is < p)"))
    problems = kept_set_problems(ours, ref, values, name, need, care)
    if problems:
        wrong(exercise, f"{call}: the kept set is wrong in {len(problems)} of {len(ours)} rows:", *problems[:3],
              _kept_set_cause(ours, ref, values, exercise))
    # The distribution to sample from: softmax over the kept tokens, with their logits as they came in.
    expected = F.softmax(logits.float().masked_fill(~ours, float("-inf")), -1)
    got = F.softmax(out.float(), -1)
    if not close(got, expected, 0, 1e-6):
        wrong(exercise, f"{call}: the right tokens are kept but their logits were changed (softmax of the output "
                        f"differs by up to {max_error(got, expected):.3g}): return the input logits with the removed "
                        "ones set to -inf, not probabilities")


def random_logits(batch=4, vocab=200, scale=3.0, seed=0) -> torch.Tensor:
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def check_top_k(filter_top_k: Callable) -> None:
    """Against Hugging Face's TopKLogitsWarper for k up to the vocabulary size. Of the tokens tied with the
    k-th largest, keeping all (as HF does) or only enough to make k is accepted."""
    __tracebackhide__ = True

    _check_top_k(filter_top_k, [(random_logits(scale=scale, seed=k), k) for k in (1, 2, 17, 199, 200)
                                for scale in (0.1, 3.0, 80.0)])


def check_top_k_with_ties(filter_top_k: Callable) -> None:
    """Logits with many ties: every token above the k-th largest kept, none below, and enough of the tied ones."""
    __tracebackhide__ = True
    ties = torch.randint(0, 4, (6, 30), generator=torch.Generator().manual_seed(1)).float()
    _check_top_k(filter_top_k, [(ties, k) for k in (1, 3, 10)])


def _check_top_k(filter_top_k: Callable, cases) -> None:
    __tracebackhide__ = True
    from transformers.generation.logits_process import TopKLogitsWarper

    for logits, k in cases:
        ref_out = TopKLogitsWarper(top_k=k)(None, logits.clone())
        out = filter_top_k(logits.clone(), k)
        need = torch.full((logits.shape[0],), min(k, logits.shape[-1]))
        expect_filter("top_k", f"filter_top_k(logits of shape {tuple(logits.shape)}, k={k})", logits, out, ref_out,
                      logits, "logit", need)


def check_top_p(filter_top_p: Callable) -> None:
    """Against Hugging Face's TopPLogitsWarper: every token more likely than HF's last kept one is kept, none
    less likely, and of those tied with it at least as many as HF keeps (HF keeps whichever its sort puts
    first; keeping them all is accepted too). Tokens below probability 1e-6 are not graded: float32 cannot
    add them up exactly enough to say on which side of p they fall."""
    __tracebackhide__ = True
    _check_top_p(filter_top_p, [(random_logits(scale=scale, seed=int(p * 1000)), p)
                                for p in (0.01, 0.3, 0.75, 0.9, 0.999, 1.0) for scale in (0.1, 3.0, 80.0)])


def check_top_p_with_ties(filter_top_p: Callable) -> None:
    """Ties inside the nucleus and at its boundary: of the tokens tied with HF's last kept one, keeping as many as
    HF (any of them) or all of them is accepted. Probabilities 0.4, 0.3, 0.3 with p = 0.5: the 0.4 and at least
    one 0.3."""
    __tracebackhide__ = True
    ties = torch.tensor([[4.0, 4.0, 1.0, 1.0, 1.0, -2.0, -2.0], [0.0, 3.0, 3.0, 3.0, -1.0, -1.0, 5.0]])
    cases = [(ties, p) for p in (0.6, 0.99, 0.5, 0.75, 0.95)]
    cases += [(torch.log(torch.tensor([[0.4, 0.3, 0.3], [0.3, 0.3, 0.4]])), 0.5)]
    _check_top_p(filter_top_p, cases)


def _check_top_p(filter_top_p: Callable, cases) -> None:
    __tracebackhide__ = True
    from transformers.generation.logits_process import TopPLogitsWarper

    for logits, p in cases:
        ref_out = TopPLogitsWarper(top_p=p)(None, logits.clone())
        out = filter_top_p(logits.clone(), p)
        probs = F.softmax(logits.float(), -1)
        expect_filter("top_p", f"filter_top_p(logits of shape {tuple(logits.shape)}, p={p})", logits, out, ref_out,
                      probs, "p", care=probs >= 1e-6)


# Every graded check of each exercise, in the order the graded tests run them: the battery in
# tests/test_grading.py runs all of them on each solution.
_CHECKS = {
    "patch_embedding": [check_patch_embedding, check_patch_embedding_stem],
    "attention": [check_attention, check_attention_formula],
    "encoder_block": [check_encoder_block, check_encoder_block_dropout],
    "rmsnorm": [check_rmsnorm, check_rmsnorm_bf16],
    "swiglu": [check_swiglu],
    "causal_mask": [check_causal_mask, check_causal_mask_in_attention, check_causal_mask_device],
    "temperature_sampling": [check_sampling_frequencies, check_sampling_seeded],
    "top_k": [check_top_k, check_top_k_with_ties],
    "top_p": [check_top_p, check_top_p_with_ties],
}
# In the registry's order; a registered exercise without checks fails here, at import.
CHECKS = {name: _CHECKS[name] for name in EXERCISES}


def run_checks(exercise: str, impl) -> None:
    """Every graded check of one exercise on `impl`; raises Wrong at the first that fails."""
    __tracebackhide__ = True
    for check in CHECKS[exercise]:
        check(impl)
