"""Fast decoding: the lesson's Transformer, one new token per row, at close to the speed of reading its weights.

A decoding step of a small batch multiplies a row or two by every weight matrix: it reads all the weights once
and does little arithmetic with them, so memory bandwidth bounds it. The lesson's modules are written to be
read, and each step pays for it around the products: three projections where one would do, complex rotary
embeddings built anew, a mask per step, a cast per norm. FastDecoder prepares once per model what a step
needs and then runs each step as a few operations per layer:

    fused matrices     wq|wk|wv as one (q, k and v from one product), w1|w3 as one (gate and up), each
                       times the weight of the RMSNorm before it (the norm is then one scale per row)
    weights' dtype     float32 or bfloat16; with either, the norms, rotary, attention and residual stream
                       stay float32. The dtype and the backend are the pair whose steps measure fastest here
                       (choose_decoding); the run says which it chose and why (describe)
    backend "torch"    PyTorch operations: oneDNN on or off and the output matrix as stored or transposed,
                       measured per batch size (trainkit.kernels.fastest_row_kernels); q and k rotated
                       together by one complex product; the query heads sharing a key/value head as one
                       (group, head_dim) block, so grouped-query attention needs no repeated keys
    backend "c"        extras/step_kernels.c, built with the machine's C compiler where there is one: products
                       that widen bfloat16 in registers and do the RMSNorms, the residual adds and SwiGLU's
                       gate in their pass over the weights, and one call for rotary, cache writes and attention;
                       five calls a layer

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
from extras.step_kernels import attend, available as kernels_available, matvec
from llama import KVCache, Transformer

DTYPES = (torch.float32, torch.bfloat16)
BACKENDS = ("torch", "c")  # PyTorch's operations; extras/step_kernels.c (CPU, where a C compiler built it)
# Another choice than float32 weights on PyTorch is made only when a step runs at least this much faster on it:
# those give the lesson model's own tokens, and a smaller gain is within the noise of a busy machine.
CHOICE_MARGIN = 1.10


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
    dtype, backend: the weights' dtype and what runs the steps (BACKENDS); where either is None, the pair whose
    decoding steps measure fastest among those that fit the other (choose_decoding).
    """

    def __init__(self, model: Transformer, dtype: Optional[torch.dtype] = None, backend: Optional[str] = None):
        model.eval()
        self.model, self.params = model, model.params
        self.version = weights_version(model)
        # The lesson's loop makes its cache in model.output.weight.dtype, which its prefill writes: the same here.
        self.output = model.output
        if dtype is None or backend is None:
            (dtype, backend), self.why = choose_decoding(model, dtype, backend)
        else:
            self.why = "as asked"
        if backend not in usable_backends(model):
            raise ValueError(f"backend 'c' needs a float32 or bfloat16 model on a CPU and the kernels built "
                             f"({kernels_available()[1]})" if backend == "c"
                             else f"backend must be one of {BACKENDS}, got {backend!r}")
        self.dtype, self.backend = dtype, backend
        self.layers = [Layer(block, dtype) for block in model.layers]
        self.w_out = fused([model.output.weight], model.norm.weight, dtype)
        self.w_out_t = None  # the (dim, vocab) copy, made when a batch size's kernels read it faster
        self.freqs_cis = model.freqs_cis
        self.cos_sin = torch.view_as_real(model.freqs_cis).float().contiguous()  # (max_seq_len, head_dim/2, 2)
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
        name = candidate_name((self.dtype, self.backend))
        kernels = (f"decoding kernels: extras/step_kernels.c ({kernels_available()[1]})" if self.backend == "c"
                   else self.kernels_for(rows).describe())
        return f"fast decoding: {name} ({self.why})\n{kernels}"

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
        if self.backend == "c":
            return self.step_c(tokens[:, 0], start_pos, cache)
        kernels = self.kernels_for(tokens.shape[0])
        with kernels.active():
            return self.step(tokens[:, 0], start_pos, cache, kernels.transposed_output)

    def step(self, tokens: torch.Tensor, pos: int, cache: KVCache, transposed_output: bool) -> torch.Tensor:
        """Logits (batch, 1, vocab) of one new token per row at position pos; its keys and values go to cache."""
        eps, dtype = self.params.norm_eps, self.dtype
        h = self.model.tok_embeddings(tokens).float()  # the residual stream stays float32
        for i, layer in enumerate(self.layers):
            qkv = F.linear(rms_normalized(h, eps).to(dtype), layer.wqkv).float()
            h.add_(F.linear(self.attend(qkv, i, pos, cache).to(dtype), layer.wo))
            gate, up = F.linear(rms_normalized(h, eps).to(dtype), layer.w13).chunk(2, dim=-1)
            h.add_(F.linear(F.silu(gate).mul_(up), layer.w2))
        x = rms_normalized(h, eps).to(dtype)
        logits = x @ self.w_out_t if transposed_output else F.linear(x, self.w_out)
        return logits[:, None]

    def step_c(self, tokens: torch.Tensor, pos: int, cache: KVCache) -> torch.Tensor:
        """The same step on extras/step_kernels.c: its products also do the RMSNorms, the residual adds and
        SwiGLU's gate in their pass over the weights, and attend the rotary, the cache writes and the attention."""
        eps = self.params.norm_eps
        h = self.model.tok_embeddings(tokens).float().contiguous()
        qkv = torch.empty(h.shape[0], self.layers[0].wqkv.shape[0])
        hidden = torch.empty(h.shape[0], self.layers[0].w13.shape[0] // 2)
        cos_sin = self.cos_sin[pos]
        for i, layer in enumerate(self.layers):
            matvec(h, layer.wqkv, out=qkv, eps=eps)
            out = attend(qkv, cos_sin, cache.k[i], cache.v[i], pos, self.params.n_heads, cache.pad)
            matvec(out, layer.wo, out=h, accumulate=True)
            matvec(h, layer.w13, out=hidden, eps=eps, gated=True)
            matvec(hidden, layer.w2, out=h, accumulate=True)
        return matvec(h, self.w_out, eps=eps)[:, None]

    def attend(self, qkv: torch.Tensor, i: int, pos: int, cache: KVCache) -> torch.Tensor:
        """Layer i's attention output (batch, n_heads * head_dim) for the new tokens' q|k|v (batch, q+k+v): rotary
        on q and k, k and v into the cache at pos, the query attending to positions 0..pos."""
        p, bsz, q_dim, kv_dim = self.params, qkv.shape[0], self.q_dim, self.kv_dim
        mask = self.key_mask(cache)
        mask = None if mask is None else mask[..., :pos + 1]
        # Meta's rotary pairs (adjacent channels) as complex numbers: q and k of all heads in one product
        qk = torch.view_as_complex(qkv[:, :q_dim + kv_dim].view(bsz, -1, p.head_dim // 2, 2))
        qk.mul_(self.freqs_cis[pos])
        k_cache, v_cache = cache.k[i], cache.v[i]
        k_cache[:, :, pos] = qkv[:, q_dim:q_dim + kv_dim].view(bsz, p.n_kv_heads, p.head_dim)
        v_cache[:, :, pos] = qkv[:, q_dim + kv_dim:].view(bsz, p.n_kv_heads, p.head_dim)
        # query head j reads key/value head j // group: the group's queries are one block of rows
        q = qkv[:, :q_dim].view(bsz, p.n_kv_heads, p.n_heads // p.n_kv_heads, p.head_dim).to(k_cache.dtype)
        out = F.scaled_dot_product_attention(q, k_cache[:, :, :pos + 1], v_cache[:, :, :pos + 1], attn_mask=mask)
        return out.reshape(bsz, q_dim)


def weights_version(model: Transformer) -> int:
    """Changes whenever a parameter is changed in place (an optimizer step, load_state_dict): PyTorch counts
    every in-place write to a tensor."""
    return sum(p._version for p in model.parameters())


_DECODERS: "weakref.WeakKeyDictionary[Transformer, FastDecoder]" = weakref.WeakKeyDictionary()


def fast_decoder(model: Transformer, dtype: Optional[torch.dtype] = None, backend: Optional[str] = None) -> FastDecoder:
    """The model's FastDecoder, built at the first call and again when the weights, the dtype or the backend
    asked changed."""
    decoder = _DECODERS.get(model)
    if (decoder is None or decoder.version != weights_version(model)
            or (dtype is not None and decoder.dtype != dtype)
            or (backend is not None and decoder.backend != backend)):
        decoder = _DECODERS[model] = FastDecoder(model, dtype, backend)
    return decoder


# ----------------------------------------------------------------------------------------------------
# The weights' dtype and the backend: measured on decoding steps


def usable_backends(model: Transformer) -> tuple[str, ...]:
    """BACKENDS that can decode the model: extras/step_kernels.c for a float32 or bfloat16 model (its cache's
    dtype) on a CPU, where the kernels were built and checked."""
    weight = model.output.weight
    c = weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16) and kernels_available()[0]
    return BACKENDS if c else BACKENDS[:1]


def candidate_name(candidate: tuple[torch.dtype, str]) -> str:
    dtype, backend = candidate
    return f"{str(dtype).removeprefix('torch.')} weights on " + ("PyTorch" if backend == "torch"
                                                                  else "extras/step_kernels.c")


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


def time_candidates(model: Transformer, candidates: list[tuple[torch.dtype, str]],
                    rounds: int = 3) -> dict[tuple[torch.dtype, str], float]:
    """Median seconds of a decoding step on each (dtype, backend); the candidates take turns, so that a busy
    moment of the machine hits all alike. One set of prepared weights per dtype."""
    decoders = {dtype: FastDecoder(model, dtype, "torch") for dtype in dict.fromkeys(d for d, _ in candidates)}
    times = {c: [] for c in candidates}
    for _ in range(rounds):
        for dtype, backend in candidates:
            decoders[dtype].backend = backend
            times[(dtype, backend)] += step_seconds(decoders[dtype])
    return {c: statistics.median(t) for c, t in times.items()}


def choose_decoding(model: Transformer, dtype: Optional[torch.dtype] = None,
                    backend: Optional[str] = None) -> tuple[tuple[torch.dtype, str], str]:
    """The (dtype, backend) whose decoding steps are fastest here, among those that fit the given dtype or
    backend; returns it and why. The first candidate (float32 weights on PyTorch, where it fits) is kept unless
    another is CHOICE_MARGIN faster."""
    usable = usable_backends(model)
    candidates = [(d, p) for d in DTYPES for p in usable if dtype in (None, d) and backend in (None, p)]
    if not candidates:
        raise ValueError(f"backend {backend!r} cannot decode this model here (backends that can: {usable})")
    if len(candidates) == 1:
        return candidates[0], "the only choice here" + ("" if "c" in usable else
                                                          f"; extras/step_kernels.c: {kernels_available()[1]}")
    seconds = time_candidates(model, candidates)
    first = candidates[0]
    fastest = min(candidates, key=seconds.get)
    measured = "a step measured " + ", ".join(f"{1e3 * seconds[c]:.1f} ms on {candidate_name(c)}" for c in candidates)
    if seconds[first] > CHOICE_MARGIN * seconds[fastest]:
        return fastest, measured
    return first, measured + (f"; {candidate_name(first)} are kept for a gain below {CHOICE_MARGIN - 1:.0%}"
                              if fastest != first else "")
