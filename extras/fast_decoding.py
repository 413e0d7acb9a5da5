"""Fast decoding: the lesson's Transformer, one new token per row, at close to the speed of reading its weights.

A decoding step of a small batch multiplies a row or two by every weight matrix: it reads all the weights once
and does little arithmetic with them, so memory bandwidth bounds it. The lesson's modules are written to be
read, and each step pays for it around the products: three projections where one would do, complex rotary
embeddings built anew, a mask per step, a cast per norm. FastDecoder prepares once per model what a step
needs and then runs each step as a few operations per layer:

    fused matrices     wq|wk|wv as one (q, k and v from one product), w1|w3 as one (gate and up), each
                       times the weight of the RMSNorm before it (the norm is then one scale per row)
    weights' dtype     float32 or bfloat16, whichever a measured decoding step says is faster here
                       (bfloat16 products keep float32 norms, rotary, attention and residual stream)
    kernels            oneDNN on or off, output matrix as stored or transposed: measured per batch size
                       (trainkit.kernels.fastest_row_kernels)
    rotary             q and k rotated together, in place, by one complex product with the position's row
    attention          the query heads sharing a key/value head are one (group, head_dim) block, so grouped
                       query attention needs no repeated keys; the padding mask is made once per cache

The interface is the model's, so that the lesson's decoding loop (llama_generation.generate_tokens) drives it
unchanged:

    decoder = FastDecoder(model)                  # or fast_decoder(model): built once, rebuilt after training
    decoder.params, decoder.output                # the model's ModelArgs and output layer (its weight's dtype
                                                  # is the cache's: the lesson's prefill writes the cache)
    cache = KVCache(decoder.params, batch, device, decoder.output.weight.dtype)  # pad_left and all
    logits = decoder(prompt, 0, cache)            # prefill: the lesson's own forward fills the cache
    logits = decoder(next_tokens, pos, cache)     # (batch, 1) tokens: the fast step, same cache
    decoder(tokens)                               # no cache: the lesson's forward

Keys and values stay in the lesson's KVCache (batch, n_kv_heads, max_seq_len, head_dim), so a prompt runs
through the readable model and the steps after it read what it wrote. In float32 the greedy tokens are the
lesson model's (tests/test_fast_decoding.py checks them against it and against Hugging Face's generate).
The fused matrices are copies: decoding holds the model's weights twice.
"""

from __future__ import annotations

import statistics
import time
import weakref
from dataclasses import replace
from typing import Optional

import torch
import torch.nn.functional as F

import trainkit
from llama import KVCache, Transformer

DTYPES = (torch.float32, torch.bfloat16)
# bfloat16 weights are chosen only when a step runs at least this much faster in them: float32 gives the lesson
# model's own tokens, and a smaller gain is within the noise of a busy machine.
DTYPE_MARGIN = 1.10


def fused(matrices: list[torch.Tensor], norm: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The matrices stacked as one (their products with a row come out side by side), times the RMSNorm weight
    before them: W (g * x) = (W * g) x, so a step skips the norm's multiplication. Computed in float32."""
    w = torch.cat([m.detach().float() for m in matrices])
    if norm is not None:
        w = w * norm.detach().float()[None, :]
    return w.to(dtype).contiguous()


class Layer:
    """One TransformerBlock's weights as a decoding step reads them."""

    def __init__(self, block, dtype: torch.dtype):
        a, f = block.attention, block.feed_forward
        self.wqkv = fused([a.wq.weight, a.wk.weight, a.wv.weight], block.attention_norm.weight, dtype)
        self.wo = fused([a.wo.weight], None, dtype)
        self.w13 = fused([f.w1.weight, f.w3.weight], block.ffn_norm.weight, dtype)
        self.w2 = fused([f.w2.weight], None, dtype)


def rms_normalized(h: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm without its weight (folded into the next matrix): h / sqrt(mean(h^2) + eps)."""
    return h * torch.rsqrt(h.square().mean(-1, keepdim=True).add_(eps))


class FastDecoder:
    """The lesson's Transformer for decoding: called like it, decoder(tokens, start_pos, cache) -> logits.

    tokens (batch, 1) with a cache run the fast step; anything else (a prompt, no cache) the model itself.
    dtype: the weights' dtype in a step; None measures float32 and bfloat16 (choose_dtype) and keeps the faster.
    """

    def __init__(self, model: Transformer, dtype: Optional[torch.dtype] = None):
        model.eval()
        self.model, self.params = model, model.params
        self.version = weights_version(model)
        # The lesson's loop makes its cache in model.output.weight.dtype, which its prefill writes: the same here.
        self.output = model.output
        if dtype is None:
            dtype, self.why = choose_dtype(model)
        else:
            self.why = "as asked"
        self.dtype = dtype
        self.layers = [Layer(block, dtype) for block in model.layers]
        self.w_out = fused([model.output.weight], model.norm.weight, dtype)
        self.w_out_t = None  # the (dim, vocab) copy, made when a batch size's kernels read it faster
        self.freqs_cis = model.freqs_cis
        self.kernels: dict[int, trainkit.kernels.RowKernels] = {}  # rows -> measured kernels
        self.allowed: "weakref.WeakKeyDictionary[KVCache, torch.Tensor]" = weakref.WeakKeyDictionary()
        p = self.params
        self.q_dim, self.kv_dim = p.n_heads * p.head_dim, p.n_kv_heads * p.head_dim

    def eval(self) -> "FastDecoder":
        self.model.eval()  # the prompt runs through the model: no dropout there
        return self

    def kernels_for(self, rows: int) -> trainkit.kernels.RowKernels:
        """The matmul kernels of a step of `rows` rows, measured on the prepared matrices at first use."""
        if rows not in self.kernels:
            first = self.layers[0]
            self.kernels[rows] = trainkit.kernels.fastest_row_kernels([first.wqkv, first.wo, first.w13, first.w2],
                                                              len(self.layers), self.w_out, rows)
            if self.kernels[rows].transposed_output and self.w_out_t is None:
                self.w_out_t = self.w_out.t().contiguous()
        return self.kernels[rows]

    def describe(self, rows: int = 1) -> str:
        name = str(self.dtype).removeprefix("torch.")
        return f"fast decoding: {name} weights ({self.why})\n{self.kernels_for(rows).describe()}"

    def key_mask(self, cache: KVCache) -> Optional[torch.Tensor]:
        """(batch, 1, 1, max_seq_len) bool, True at the keys a new token may see: all but the left padding."""
        if cache.pad is None:
            return None
        if cache not in self.allowed:
            self.allowed[cache] = ~cache.pad[:, None, None, :]
        return self.allowed[cache]

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, start_pos: int = 0, cache: Optional[KVCache] = None) -> torch.Tensor:
        if cache is None or tokens.shape[1] != 1:
            return self.model(tokens, start_pos, cache)
        if start_pos + 1 > self.params.max_seq_len:
            raise ValueError(f"positions up to {start_pos + 1} exceed max_seq_len={self.params.max_seq_len}")
        kernels = self.kernels_for(tokens.shape[0])
        with kernels.active():
            return self.step(tokens[:, 0], start_pos, cache, kernels.transposed_output)

    def step(self, tokens: torch.Tensor, pos: int, cache: KVCache, transposed_output: bool) -> torch.Tensor:
        """Logits (batch, 1, vocab) of one new token per row at position pos; its keys and values go to cache."""
        p, dtype = self.params, self.dtype
        bsz, end, group = tokens.shape[0], pos + 1, p.n_heads // p.n_kv_heads
        q_dim, kv_dim = self.q_dim, self.kv_dim
        mask = self.key_mask(cache)
        mask = None if mask is None else mask[..., :end]
        freqs = self.freqs_cis[pos]
        h = self.model.tok_embeddings(tokens).float()  # the residual stream stays float32
        for i, layer in enumerate(self.layers):
            qkv = F.linear(rms_normalized(h, p.norm_eps).to(dtype), layer.wqkv).float()
            # Meta's rotary pairs (adjacent channels) as complex numbers: q and k of all heads in one product
            qk = torch.view_as_complex(qkv[:, :q_dim + kv_dim].view(bsz, -1, p.head_dim // 2, 2))
            qk.mul_(freqs)
            k_cache, v_cache = cache.k[i], cache.v[i]
            k_cache[:, :, pos] = qkv[:, q_dim:q_dim + kv_dim].view(bsz, p.n_kv_heads, p.head_dim)
            v_cache[:, :, pos] = qkv[:, q_dim + kv_dim:].view(bsz, p.n_kv_heads, p.head_dim)
            # query head j reads key/value head j // group: the group's queries are one block of rows
            q = qkv[:, :q_dim].view(bsz, p.n_kv_heads, group, p.head_dim).to(k_cache.dtype)
            out = F.scaled_dot_product_attention(q, k_cache[:, :, :end], v_cache[:, :, :end], attn_mask=mask)
            h.add_(F.linear(out.reshape(bsz, q_dim).to(dtype), layer.wo))
            gate, up = F.linear(rms_normalized(h, p.norm_eps).to(dtype), layer.w13).chunk(2, dim=-1)
            h.add_(F.linear(F.silu(gate).mul_(up), layer.w2))
        x = rms_normalized(h, p.norm_eps).to(dtype)
        logits = x @ self.w_out_t if transposed_output else F.linear(x, self.w_out)
        return logits[:, None]


def weights_version(model: Transformer) -> int:
    """Changes whenever a parameter is changed in place (an optimizer step, load_state_dict): PyTorch counts
    every in-place write to a tensor."""
    return sum(p._version for p in model.parameters())


_DECODERS: "weakref.WeakKeyDictionary[Transformer, FastDecoder]" = weakref.WeakKeyDictionary()


def fast_decoder(model: Transformer, dtype: Optional[torch.dtype] = None) -> FastDecoder:
    """The model's FastDecoder, built at the first call and again when the weights or the dtype asked changed."""
    decoder = _DECODERS.get(model)
    if (decoder is None or decoder.version != weights_version(model)
            or (dtype is not None and decoder.dtype != dtype)):
        decoder = _DECODERS[model] = FastDecoder(model, dtype)
    return decoder


# ----------------------------------------------------------------------------------------------------
# The weights' dtype: measured on a decoding step


def step_seconds(decoder: FastDecoder, rows: int = 1, steps: int = 3) -> list[float]:
    """Wall-clock seconds of `steps` decoding steps of `rows` rows each, after a short random prompt (the first
    step, which measures the kernels, is not counted)."""
    params = replace(decoder.params, max_seq_len=min(decoder.params.max_seq_len, 16 + steps))
    device = decoder.w_out.device
    cache = KVCache(params, rows, device, decoder.output.weight.dtype)
    prompt = torch.randint(0, params.vocab_size, (rows, 8), device=device)
    decoder(prompt, 0, cache)
    token = prompt[:, -1:]
    decoder(token, 8, cache)
    times = []
    for pos in range(9, 9 + steps):
        trainkit.precision.synchronize(device)
        t0 = time.perf_counter()
        decoder(token, pos, cache)
        trainkit.precision.synchronize(device)
        times.append(time.perf_counter() - t0)
    return times


def time_dtypes(model: Transformer, dtypes=DTYPES, rounds: int = 3) -> dict[torch.dtype, float]:
    """Median seconds of a decoding step with the weights in each dtype; the candidates take turns, so that a
    busy moment of the machine hits all alike."""
    decoders = {dtype: FastDecoder(model, dtype) for dtype in dtypes}
    times = {dtype: [] for dtype in dtypes}
    for _ in range(rounds):
        for dtype, decoder in decoders.items():
            times[dtype] += step_seconds(decoder)
    return {dtype: statistics.median(t) for dtype, t in times.items()}


def choose_dtype(model: Transformer) -> tuple[torch.dtype, str]:
    """float32 or bfloat16 weights for decoding, by timing a step in each; returns the dtype and why."""
    seconds = time_dtypes(model)
    fp32, bf16 = seconds[torch.float32], seconds[torch.bfloat16]
    measured = f"a step measured {1e3 * fp32:.1f} ms in float32, {1e3 * bf16:.1f} ms in bfloat16"
    if fp32 > DTYPE_MARGIN * bf16:
        return torch.bfloat16, measured
    return torch.float32, measured + (f"; bfloat16 is kept for a gain above {DTYPE_MARGIN - 1:.0%}"
                                      if fp32 > bf16 else "")
