"""Attention maps of transformer.py's ViT (extras/vit_attention.py): the probabilities recomputed from a block's
own weights against the weights nn.MultiheadAttention returns, attention rollout on cases worked out by hand,
the whole model's maps against torchvision's VisionTransformer with the same weights, and independence from how
the student wrote MultiHeadSelfAttention.forward."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import transformer as T
from extras import vit_attention as A
from extras.vit_pretrained import from_torchvision_state_dict
from test_transformer import randomize_, small_config, torchvision_vit


# ---------------------------------------------------------------------------------------------------- pure functions


@pytest.mark.parametrize("batch, seq, dim, heads", [(1, 1, 8, 1), (3, 7, 48, 4), (2, 65, 96, 3)])
def test_attention_probabilities_equal_nn_multiheadattention_weights(batch, seq, dim, heads):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(dim, heads, batch_first=True).eval()
    with torch.no_grad():
        mha.in_proj_weight.normal_(0, dim ** -0.5)
        mha.in_proj_bias.normal_(0, 0.5)
    x = torch.randn(batch, seq, dim)
    _, expected = mha(x, x, x, need_weights=True, average_attn_weights=False)  # (B, heads, N, N)
    got = A.attention_probabilities(x, mha.in_proj_weight, mha.in_proj_bias, heads)
    assert got.shape == (batch, heads, seq, seq)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_rollout_of_identity_attention_is_the_identity():
    eye = torch.eye(5).expand(2, 3, 5, 5)  # 2 images, 3 heads
    torch.testing.assert_close(A.attention_rollout([eye] * 4), torch.eye(5).expand(2, 5, 5))


def test_rollout_rows_sum_to_one_and_one_block_is_half_attention_half_residual():
    g = torch.Generator().manual_seed(0)
    attentions = [torch.randn(2, 4, 6, 6, generator=g).softmax(-1) for _ in range(3)]
    rolled = A.attention_rollout(attentions)
    assert rolled.shape == (2, 6, 6) and bool((rolled >= 0).all())
    torch.testing.assert_close(rolled.sum(-1), torch.ones(2, 6))
    one = A.attention_rollout(attentions[:1])
    torch.testing.assert_close(one, 0.5 * attentions[0].mean(1) + 0.5 * torch.eye(6))


def test_rollout_on_a_two_token_case_worked_by_hand():
    # block 1, two heads: [[1,0],[0,1]] and [[0,1],[1,0]] average to 0.5 everywhere; with the residual,
    #   A1 = ([[.5,.5],[.5,.5]] + I) / 2 = [[.75,.25],[.25,.75]]
    # block 2, one map: every token looks at token 1: [[0,1],[0,1]] -> A2 = [[.5,.5],[0,1]]
    # rollout A2 A1 = [[.5*.75 + .5*.25, .5*.25 + .5*.75], [.25, .75]] = [[.5,.5],[.25,.75]]
    block1 = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]])[None]
    block2 = torch.tensor([[[0.0, 1.0], [0.0, 1.0]]] * 2)[None]
    torch.testing.assert_close(A.attention_rollout([block1, block2]), torch.tensor([[[0.5, 0.5], [0.25, 0.75]]]))
    # the order matters: A1 A2 = [[.75*.5, .75*.5 + .25], [.25*.5, .25*.5 + .75]]
    torch.testing.assert_close(A.attention_rollout([block2, block1]),
                               torch.tensor([[[0.375, 0.625], [0.125, 0.875]]]))


# ---------------------------------------------------------------------------------------------------- the model


def tv_attention_weights(tv_model, images):
    """Each torchvision encoder block's attention weights, asked of its nn.MultiheadAttention directly."""
    weights = []

    def catch(module, args):
        x = args[0]
        weights.append(module.forward(x, x, x, need_weights=True, average_attn_weights=False)[1])  # no hooks again

    hooks = [layer.self_attention.register_forward_pre_hook(catch) for layer in tv_model.encoder.layers]
    with torch.no_grad():
        tv_model(images)
    for h in hooks:
        h.remove()
    return weights


@pytest.mark.needs("patch_embedding", "attention", "encoder_block")
def test_model_attention_maps_equal_torchvision_vits_with_the_same_weights():
    torch.manual_seed(0)
    c = small_config()
    ref = randomize_(torchvision_vit(c), std=0.1).eval()
    ours = T.VisionTransformer(c).eval()
    ours.load_state_dict(from_torchvision_state_dict(ref.state_dict()))
    images = torch.randn(3, 3, c.image_size, c.image_size)
    expected = tv_attention_weights(ref, images)
    got = A.attention_weights(ours, images)
    assert len(got) == c.depth
    for g, e in zip(got, expected):
        assert g.shape == (3, c.n_heads, c.n_patches + 1, c.n_patches + 1)
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-4)
    maps = A.class_token_maps(ours, images)
    grid = c.image_size // c.patch_size
    for name, m in maps.items():
        assert m.shape == (3, grid, grid), name
    torch.testing.assert_close(maps["class token, last block"].flatten(1), expected[-1].mean(1)[:, 0, 1:])
    torch.testing.assert_close(maps["attention rollout, all blocks"].flatten(1),
                               A.attention_rollout(expected)[:, 0, 1:])


def sdpa_forward(self, x):
    """Another correct MultiHeadSelfAttention.forward, written as a student might: qkv by reshape, SDPA."""
    B, N, D = x.shape
    q, k, v = self.qkv(x).reshape(B, N, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
    return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D))


@pytest.mark.needs("patch_embedding", "encoder_block")
def test_attention_maps_do_not_depend_on_how_attention_forward_is_written(monkeypatch):
    torch.manual_seed(0)
    model = T.VisionTransformer(small_config())
    randomize_(model, std=0.1)
    images = torch.randn(2, 3, 32, 32)
    monkeypatch.setattr(T.MultiHeadSelfAttention, "forward", T.MultiHeadSelfAttention.forward)
    try:
        reference = A.attention_weights(model, images)
    except NotImplementedError:  # a student copy without the attention exercise: use the SDPA one as truth
        monkeypatch.setattr(T.MultiHeadSelfAttention, "forward", sdpa_forward)
        reference = A.attention_weights(model, images)
    monkeypatch.setattr(T.MultiHeadSelfAttention, "forward", sdpa_forward)
    for got, ref in zip(A.attention_weights(model, images), reference):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
