"""A decoding step's kernels, compiled from extras/step_kernels.c with the machine's C compiler.

    y = matvec(x, w)                                   # x (m, k) float32, w (n, k) float32 or bfloat16 -> (m, n)
    matvec(x, w, eps=1e-5)                             # W (x / rms(x)): the RMSNorm before the product
    matvec(x, w, out=h, accumulate=True)               # h += W x: the residual add
    matvec(x, w13, eps=1e-5, gated=True)               # silu(W1 x) * (W3 x), w13 = w1|w3 stacked
    out = attend(qkv, cos_sin, k_cache, v_cache, pos, n_heads, pad)   # rotary, cache writes, attention

Built once per process, at first use, into a temporary file (under a second; -march=native, so never shared
between machines), then checked against PyTorch on a few shapes before it is used. available() says whether
that worked and why not: no C compiler (CC names one), a failed build, a wrong result. extras/fast_decoding.py
times decoding steps on these kernels and on PyTorch's on the machine at hand and keeps the faster.
"""

from __future__ import annotations

import ctypes
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from extras import native

SOURCE = Path(__file__).with_name("step_kernels.c")
MATVEC = {torch.float32: "matvec_f32", torch.bfloat16: "matvec_bf16"}  # by the weights' dtype
ATTEND = {torch.float32: "attend_f32", torch.bfloat16: "attend_bf16"}  # by the cache's dtype


@lru_cache(maxsize=None)
def library() -> tuple[Optional[ctypes.CDLL], str]:
    """The compiled kernels and how they were built, or None and why there are none."""
    lib, how = native.build(SOURCE)
    if lib is None:
        return None, how
    for name in MATVEC.values():
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long] * 3 + [ctypes.c_float] + [ctypes.c_int] * 3
        fn.restype = None
    for name in ATTEND.values():
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_long] * 6 + [ctypes.c_int]
        fn.restype = None
    return lib, how


def matvec(x: torch.Tensor, w: torch.Tensor, out: Optional[torch.Tensor] = None, eps: Optional[float] = None,
           accumulate: bool = False, gated: bool = False) -> torch.Tensor:
    """W x for each row x of x, in float32; see the module's docstring. Tensors on the CPU and contiguous, x and
    out float32; `out` (m, n) is written (or added to, with accumulate) and returned."""
    lib = library()[0]
    m, k = x.shape
    n = w.shape[0] // 2 if gated else w.shape[0]
    if not (x.dtype == torch.float32 and w.dtype in MATVEC and w.shape[1] == k
            and x.is_contiguous() and w.is_contiguous() and x.device.type == w.device.type == "cpu"):
        raise ValueError(f"matvec needs float32 rows and a float32 or bfloat16 matrix of the same width, contiguous "
                         f"on the CPU; got x {x.dtype} {tuple(x.shape)}, w {w.dtype} {tuple(w.shape)}")
    if out is None:
        out = torch.zeros(m, n) if accumulate else torch.empty(m, n)
    elif out.shape != (m, n) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 ({m}, {n}) tensor, got {out.dtype} {tuple(out.shape)}")
    getattr(lib, MATVEC[w.dtype])(x.data_ptr(), w.data_ptr(), out.data_ptr(), m, n, k,
                                  -1.0 if eps is None else eps, int(accumulate), int(gated), torch.get_num_threads())
    return out


def attend(qkv: torch.Tensor, cos_sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
           pos: int, n_heads: int, pad: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The attention of one new token per row at position pos (see step_kernels.c): rotates q and k of qkv
    (m, q|k|v) in place, stores k and v in the caches (m, n_kv_heads, max_seq_len, head_dim) at pos, and returns
    the attention output (m, n_heads * head_dim). cos_sin (head_dim/2, 2): the rotation of position pos; pad
    (m, max_seq_len) bool, True at left padding, or None."""
    lib = library()[0]
    m, n_kv, max_seq, hd = k_cache.shape
    if not (qkv.dtype == cos_sin.dtype == torch.float32 and k_cache.dtype == v_cache.dtype and k_cache.dtype in ATTEND
            and qkv.shape == (m, (n_heads + 2 * n_kv) * hd) and cos_sin.numel() == hd and 0 <= pos < max_seq
            and v_cache.shape == k_cache.shape and (pad is None or pad.shape == (m, max_seq) and pad.dtype == torch.bool)
            and all(t.is_contiguous() and t.device.type == "cpu" for t in (qkv, cos_sin, k_cache, v_cache))
            and (pad is None or pad.is_contiguous())):
        raise ValueError(f"attend got shapes or dtypes it cannot take: qkv {qkv.dtype} {tuple(qkv.shape)}, "
                         f"caches {k_cache.dtype} {tuple(k_cache.shape)}, cos_sin {tuple(cos_sin.shape)}, pos {pos}")
    out = torch.empty(m, n_heads * hd)
    getattr(lib, ATTEND[k_cache.dtype])(qkv.data_ptr(), cos_sin.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                                        None if pad is None else pad.data_ptr(), out.data_ptr(), m, n_heads, n_kv,
                                        hd, max_seq, pos, torch.get_num_threads())
    return out


def attend_reference(qkv, cos_sin, k_cache, v_cache, pos, n_heads, pad=None) -> torch.Tensor:
    """What attend computes, in PyTorch: the same updates of qkv and the caches, and the output."""
    m, n_kv, max_seq, hd = k_cache.shape
    rotated = torch.view_as_complex(qkv[:, :(n_heads + n_kv) * hd].reshape(m, -1, hd // 2, 2))
    rotated.mul_(torch.view_as_complex(cos_sin.reshape(hd // 2, 2)))
    q, k, v = qkv.split([n_heads * hd, n_kv * hd, n_kv * hd], dim=1)
    k_cache[:, :, pos] = k.view(m, n_kv, hd)
    v_cache[:, :, pos] = v.view(m, n_kv, hd)
    keys = k_cache[:, :, :pos + 1].float().repeat_interleave(n_heads // n_kv, dim=1)
    values = v_cache[:, :, :pos + 1].float().repeat_interleave(n_heads // n_kv, dim=1)
    mask = None if pad is None else ~pad[:, None, None, :pos + 1]
    out = F.scaled_dot_product_attention(q.view(m, n_heads, 1, hd), keys, values, attn_mask=mask)
    return out.reshape(m, n_heads * hd)


def reference(x: torch.Tensor, w: torch.Tensor, eps: Optional[float] = None, gated: bool = False) -> torch.Tensor:
    """What matvec computes, in PyTorch (without accumulate)."""
    if eps is not None:
        x = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
    y = F.linear(x, w.float())
    if gated:
        gate, up = y.chunk(2, dim=-1)
        y = F.silu(gate) * up
    return y


@lru_cache(maxsize=None)
def available() -> tuple[bool, str]:
    """Whether matvec can be used here (built, and right on shapes with and without remainders), and why."""
    return native.verified(library(), differences)


def differences() -> Optional[str]:
    """What of the kernels differs from PyTorch on a few shapes with and without remainders, or None."""
    gen = torch.Generator().manual_seed(0)
    for dtype in MATVEC:
        for m, n, k in ((1, 40, 64), (3, 13, 37), (2, 64, 1000)):
            x, w = torch.randn(m, k, generator=gen), torch.randn(2 * n, k, generator=gen).to(dtype)
            for eps, gated in ((None, False), (1e-5, False), (1e-5, True)):
                ours = matvec(x, w, eps=eps, gated=gated)
                if not torch.allclose(ours, reference(x, w, eps, gated), rtol=1e-4, atol=1e-4):
                    return "its products differ from PyTorch's"
        for m, n_heads, n_kv, hd, pos in ((1, 4, 4, 16, 0), (3, 6, 2, 32, 9)):
            qkv = torch.randn(m, (n_heads + 2 * n_kv) * hd, generator=gen)
            cos_sin = torch.view_as_real(torch.polar(torch.ones(hd // 2), torch.rand(hd // 2, generator=gen) * 6))
            caches = [torch.randn(m, n_kv, 12, hd, generator=gen).to(dtype) for _ in range(2)]
            pad = torch.arange(12)[None, :] < torch.arange(m)[:, None]  # row i: i pads
            expected = [c.clone() for c in caches]
            theirs = attend_reference(qkv.clone(), cos_sin, *expected, pos, n_heads, pad)
            ours = attend(qkv, cos_sin.contiguous(), *caches, pos, n_heads, pad)
            if not (torch.allclose(ours, theirs, rtol=1e-4, atol=1e-4)
                    and all(torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6) for a, b in zip(caches, expected))):
                return "its attention differs from PyTorch's"
    return None
