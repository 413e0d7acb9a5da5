"""extras/step_kernels.c against PyTorch: its products against F.linear, torch.nn.RMSNorm and F.silu; its
attention against F.scaled_dot_product_attention with grouped key/value heads and a padding mask, its rotary
against a complex rotation written here, its cache writes against .to(bfloat16). Shapes with and without
remainders of the kernels' 16 lanes and 8-row blocks. No timing is asserted."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # extras/ of this repository

from extras import step_kernels as sk  # noqa: E402

BUILT, WHY = sk.available()
pytestmark = pytest.mark.skipif(not BUILT, reason=f"no C kernels here: {WHY}")
DTYPES = [torch.float32, torch.bfloat16]
# (rows, outputs, inputs): one row and a few; whole blocks and lanes, and remainders of both
SHAPES = [(1, 64, 64), (1, 40, 576), (2, 13, 37), (4, 96, 1000), (1, 8, 16)]


def weights(n, k, dtype, seed=0):
    return (torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) / k ** 0.5).to(dtype)


def rows(m, k, seed=1):
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_the_product_is_f_linear_on_the_weights_widened_to_float32(m, n, k, dtype):
    x, w = rows(m, k), weights(n, k, dtype)
    torch.testing.assert_close(sk.matvec(x, w), F.linear(x, w.float()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_with_eps_the_rows_are_rms_normalized_first_as_torch_rmsnorm_does(m, n, k, dtype):
    x, w = rows(m, k) * 3.0, weights(n, k, dtype)
    norm = torch.nn.RMSNorm(k, eps=1e-5, elementwise_affine=False)
    torch.testing.assert_close(sk.matvec(x, w, eps=1e-5), F.linear(norm(x), w.float()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_gated_is_swiglus_silu_gate_times_up_of_the_stacked_matrix(m, n, k, dtype):
    x, w1, w3 = rows(m, k), weights(n, k, dtype, seed=2), weights(n, k, dtype, seed=3)
    norm = torch.nn.RMSNorm(k, eps=1e-6, elementwise_affine=False)
    expected = F.silu(F.linear(norm(x), w1.float())) * F.linear(norm(x), w3.float())
    ours = sk.matvec(x, torch.cat([w1, w3]), eps=1e-6, gated=True)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_accumulate_adds_to_out_and_returns_it(dtype):
    x, w = rows(2, 37), weights(13, 37, dtype)
    h = rows(2, 13, seed=5)
    before = h.clone()
    assert sk.matvec(x, w, out=h, accumulate=True) is h
    torch.testing.assert_close(h, before + F.linear(x, w.float()), rtol=1e-5, atol=1e-5)


def test_wrong_dtypes_shapes_or_layouts_are_refused_not_read_out_of_bounds():
    x, w = rows(1, 64), weights(32, 64, torch.float32)
    for bad_x, bad_w in ((x.double(), w), (x, w.half()), (rows(1, 63), w), (x, w.t().contiguous().t()),
                         (rows(64, 2).t(), w)):
        with pytest.raises(ValueError, match="matvec needs"):
            sk.matvec(bad_x, bad_w)
    with pytest.raises(ValueError, match="out must be"):
        sk.matvec(x, w, out=torch.empty(1, 31))


# ----------------------------------------------------------------------------------------------------
# Attention of one new token per row


def rotated(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """x (..., head_dim) with channel pairs (2j, 2j+1) turned by angles[j], as Meta's rotary embeddings do:
    (a, b) -> (a cos - b sin, a sin + b cos)."""
    a, b = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = a * angles.cos() - b * angles.sin()
    out[..., 1::2] = a * angles.sin() + b * angles.cos()
    return out


@pytest.mark.parametrize("cache_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,n_heads,n_kv,hd,pos", [(1, 4, 4, 16, 0), (1, 9, 3, 64, 20), (3, 8, 1, 32, 11),
                                                   (2, 6, 2, 48, 30)])
def test_attend_rotates_stores_and_attends_like_sdpa_with_grouped_heads_and_padding(m, n_heads, n_kv, hd, pos,
                                                                                  cache_dtype):
    gen = torch.Generator().manual_seed(pos)
    max_seq = 32
    qkv = torch.randn(m, (n_heads + 2 * n_kv) * hd, generator=gen)
    angles = torch.rand(hd // 2, generator=gen) * 6.0
    cos_sin = torch.stack([angles.cos(), angles.sin()], dim=-1)
    k_cache = torch.randn(m, n_kv, max_seq, hd, generator=gen).to(cache_dtype)
    v_cache = torch.randn(m, n_kv, max_seq, hd, generator=gen).to(cache_dtype)
    pad = torch.arange(max_seq)[None, :] < (torch.arange(m) * min(pos, 3))[:, None]  # row i: 3i pads (at most pos)

    q, k, v = qkv.split([n_heads * hd, n_kv * hd, n_kv * hd], dim=1)
    q = rotated(q.view(m, n_heads, hd), angles)
    k = rotated(k.view(m, n_kv, hd), angles)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    expected_k[:, :, pos] = k.to(cache_dtype)
    expected_v[:, :, pos] = v.view(m, n_kv, hd).to(cache_dtype)
    expected = F.scaled_dot_product_attention(
        q[:, :, None], expected_k[:, :, :pos + 1].float(), expected_v[:, :, :pos + 1].float(),
        attn_mask=~pad[:, None, None, :pos + 1], enable_gqa=True).reshape(m, n_heads * hd)

    ours = sk.attend(qkv, cos_sin, k_cache, v_cache, pos, n_heads, pad if pad.any() else None)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(qkv[:, :n_heads * hd], q.reshape(m, -1), rtol=1e-6, atol=1e-6)  # q rotated in place


def test_attend_refuses_shapes_that_do_not_fit_its_caches():
    k_cache = torch.zeros(1, 2, 8, 16)
    with pytest.raises(ValueError, match="attend got"):
        sk.attend(torch.zeros(1, 6 * 16), torch.zeros(8, 2), k_cache, k_cache.clone(), 0, n_heads=4)  # 4+2+2 heads
    with pytest.raises(ValueError, match="attend got"):
        sk.attend(torch.zeros(1, 8 * 16), torch.zeros(8, 2), k_cache, k_cache.clone(), 8, n_heads=4)  # pos past cache


# ----------------------------------------------------------------------------------------------------
# Building


def test_without_a_compiler_there_are_no_kernels_and_the_reason_says_so(monkeypatch):
    sk.library.cache_clear()
    try:
        monkeypatch.setenv("CC", "/nonexistent/cc")
        lib, why = sk.library()
        assert lib is None and "/nonexistent/cc" in why
    finally:
        monkeypatch.delenv("CC")
        sk.library.cache_clear()
    assert sk.library()[0] is not None
