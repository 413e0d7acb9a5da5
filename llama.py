"""Day 2: a simplified LLaMA written from scratch, trained on WikiText-2.

The model follows Meta's reference implementation (Touvron et al., 2023) and keeps its names, so the
weights of a real LLaMA checkpoint map onto it one to one:

    tokens -> tok_embeddings -> n_layers x TransformerBlock -> norm -> output -> logits
    TransformerBlock:  h   = x + attention(attention_norm(x))       (RMSNorm, rotary embeddings, causal)
                       out = h + feed_forward(ffn_norm(h))          (SwiGLU)

Run it:
    python llama.py                                    # WikiText-2 and GPT-2's tokenizer from the Hub
    python llama.py --data-dir ../shared/data/wikitext-2-raw-local --tokenizer ../shared/data/gpt2-tokenizer
    python llama.py --eval-only --checkpoint llama_wikitext_trained.pth --split test  [same data flags]
    python llama.py --eval-only --hf-model HuggingFaceTB/SmolLM2-135M      # a real Llama checkpoint's perplexity
    python llama.py --export-hf llama_hf                                     # ours for from_pretrained / pipeline
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import trainkit
from trainkit import PRECISIONS, Precision, choose_precision
from trainkit.kernels import RowKernels, fastest_row_kernels
from trainkit.losses import ChunkedCrossEntropy
from trainkit.pictures import plot_lm_curves

CHECKPOINT = "llama_wikitext_trained.pth"
SAMPLE_PROMPTS = ["In a world where", "The history of the city", "She was born in"]


class UserError(Exception):
    """A mistake in how the script was called: reported as one line, without a traceback."""


# ----------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class ModelArgs:
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: Optional[int] = None  # None: as many as n_heads; fewer gives grouped-query attention
    vocab_size: int = 50257  # GPT-2's tokenizer
    multiple_of: int = 64  # the SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 256
    dropout: float = 0.0  # not in LLaMA; small data sets need it
    tie_embeddings: bool = True  # output.weight is tok_embeddings.weight (Press & Wolf, 2017)
    ffn_hidden_dim: Optional[int] = None  # the SwiGLU hidden size when given (real checkpoints state it)
    rope_scaling: Optional[dict] = None  # Llama 3.1's long-context RoPE: {"rope_type": "llama3", "factor": ...}

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "max_seq_len"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.dim % self.n_heads:
            raise UserError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise UserError(f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})")
        if (self.dim // self.n_heads) % 2:
            raise UserError(f"the head size dim/n_heads = {self.dim // self.n_heads} must be even for rotary embeddings")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.norm_eps <= 0 or self.rope_theta <= 0:
            raise UserError("norm_eps and rope_theta must be positive")
        if self.ffn_hidden_dim is not None and self.ffn_hidden_dim < 1:
            raise UserError(f"ffn_hidden_dim must be a positive integer, got {self.ffn_hidden_dim}")
        check_rope_scaling(self.rope_scaling)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        if self.ffn_hidden_dim is not None:  # intermediate_size of a real checkpoint: not always Meta's rounding
            return self.ffn_hidden_dim
        # SwiGLU has three matrices instead of two: 2/3 of 4*dim keeps the parameter count of a 4*dim MLP.
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)


# ----------------------------------------------------------------------------------------------------
# Components


class RMSNorm(nn.Module):
    """Root mean square layer norm (Zhang & Sennrich, 2019): no mean subtraction, no bias."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # EXERCISE rmsnorm: x / sqrt(mean(x^2 over the last dim) + eps), computed in float32, times weight
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight
        # END EXERCISE


def precompute_freqs_cis(head_dim: int, end: int, theta: float = 10000.0,
                         scaling: Optional[dict] = None) -> torch.Tensor:
    """Rotary embeddings (Su et al., 2021) as unit complex numbers e^{i * m * theta_k}, shape (end, head_dim/2).

    theta_k = theta^(-2k/head_dim): each pair of channels rotates at its own frequency, by an angle
    proportional to the position m, so q.k depends only on the distance between two positions.
    """
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if scaling is not None:  # Llama 3.1 and 3.2 (see llama3_scaled_frequencies below)
        freqs = llama3_scaled_frequencies(freqs, *(scaling[k] for k in LLAMA3_SCALING_KEYS))
    angles = torch.outer(torch.arange(end, dtype=torch.float32), freqs)
    return torch.polar(torch.ones_like(angles), angles)


LLAMA3_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def check_rope_scaling(scaling: Optional[dict]) -> None:
    """Only Llama 3.1's scaling is implemented; any other kind would silently give wrong positions."""
    if scaling is None:
        return
    kind = scaling.get("rope_type")
    if kind != "llama3":
        raise UserError(f"rope scaling of type '{kind}' is not implemented; only 'llama3' (Llama 3.1 and 3.2) is")
    missing = [k for k in LLAMA3_SCALING_KEYS if k not in scaling]
    if missing:
        raise UserError(f"llama3 rope scaling needs {', '.join(missing)}")


def llama3_scaled_frequencies(freqs: torch.Tensor, factor: float, low_freq_factor: float, high_freq_factor: float,
                              original_max_position_embeddings: int) -> torch.Tensor:
    """Llama 3.1's long-context RoPE: slow frequencies divided by `factor`, fast ones kept, a blend between.

    A frequency whose wavelength 2*pi/f is longer than original/low_freq_factor never completed a turn in
    training, so it is stretched (f / factor) to cover a longer context; one shorter than
    original/high_freq_factor encodes local order and is kept. In between, s = (original/wavelength - low) /
    (high - low) goes from 0 to 1 and the frequency is (1 - s) * f / factor + s * f.
    """
    wavelength = 2 * math.pi / freqs
    low_freq_wavelength = original_max_position_embeddings / low_freq_factor
    high_freq_wavelength = original_max_position_embeddings / high_freq_factor
    smooth = (original_max_position_embeddings / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * freqs / factor + smooth * freqs
    scaled = torch.where(wavelength > low_freq_wavelength, freqs / factor, blended)
    return torch.where(wavelength < high_freq_wavelength, freqs, scaled)


def apply_rotary_emb(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate each adjacent channel pair of q and k (batch, seq, heads, head_dim) by its position's angle."""
    xq_c = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
    xk_c = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    freqs_cis = freqs_cis[None, :, None, :]  # broadcast over batch and heads
    xq_out = torch.view_as_real(xq_c * freqs_cis).flatten(3)
    xk_out = torch.view_as_real(xk_c * freqs_cis).flatten(3)
    return xq_out.type_as(xq), xk_out.type_as(xk)


def causal_mask(seqlen: int, start_pos: int = 0, device=None) -> torch.Tensor:
    """Boolean (seqlen, start_pos + seqlen) mask: True where a query may attend to a key.

    The queries are the positions start_pos .. start_pos + seqlen - 1; the keys are every position so far
    (the cached ones first). A query sees itself and everything before it, never the future.
    """
    # EXERCISE causal_mask: query i sits at position start_pos + i and may see keys 0 .. start_pos + i
    query_pos = torch.arange(start_pos, start_pos + seqlen, device=device)
    key_pos = torch.arange(start_pos + seqlen, device=device)
    return key_pos[None, :] <= query_pos[:, None]
    # END EXERCISE


CAUSAL = "causal"  # stands for causal_mask(seqlen, 0) where attention may let SDPA apply it (is_causal=True)


def attention_mask(seqlen: int, start_pos: int, cache: Optional["KVCache"], device=None):
    """What every layer's attention masks with: None (one new token sees everything cached), CAUSAL, or a
    boolean mask (seqlen, keys), or (batch, 1, seqlen, keys) with left padding."""
    padded = cache is not None and cache.pad is not None
    if seqlen == 1 and not padded:
        return None  # one new token may attend to everything cached before it
    if start_pos == 0 and not padded:
        # SDPA's is_causal=True hides key j from query i where j > i, both counted from the first of each:
        # when the queries are the keys (no cache offset), that is causal_mask(seqlen, 0), and SDPA's kernels
        # skip the masked blocks instead of reading a (seqlen, seqlen) mask.
        return CAUSAL
    # The explicit mask: queries offset by start_pos (is_causal would align them with the first key), or pads.
    mask = causal_mask(seqlen, start_pos, device) if seqlen > 1 else None
    return cache.padding_mask(mask, start_pos, seqlen) if padded else mask


def decoding_kernels(model: "Transformer", rows: int) -> RowKernels:
    """How a decoding step of `rows` rows multiplies them by the weights fastest on this machine: through
    oneDNN or PyTorch's own kernels, with the output matrix as stored or transposed. Measured once per process
    for each shape and dtype (a few milliseconds; see trainkit.kernels.fastest_row_kernels)."""
    attention, ffn = model.layers[0].attention, model.layers[0].feed_forward
    layer = [m.weight for m in (attention.wq, attention.wk, attention.wv, attention.wo, ffn.w1, ffn.w2, ffn.w3)]
    return fastest_row_kernels(layer, len(model.layers), model.output.weight, rows)


class KVCache:
    """Keys and values of every layer for the positions decoded so far, so each new token costs one position.

    k[layer] and v[layer] have shape (batch, n_kv_heads, max_seq_len, head_dim); positions < start_pos are filled.
    """

    def __init__(self, args: ModelArgs, batch_size: int, device=None, dtype=torch.float32):
        shape = (batch_size, args.n_kv_heads, args.max_seq_len, args.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)]
        self.pad = None  # (batch, max_seq_len) bool, True at the left padding of shorter prompts
        self.kernels = None  # how a decoding step's matrix products run fastest here (see kernels_for)
        self.output_t = None  # the output matrix as (dim, vocab), where that layout reads faster

    def pad_left(self, n_pad: torch.Tensor) -> None:
        """Prompts of different lengths share a batch by padding each on the left; row i has n_pad[i] pads.

        No real token attends to a pad. Rotary embeddings depend only on the distance between two positions,
        so a row shifted right by its padding gets the same attention scores as it would alone.
        """
        positions = torch.arange(self.k[0].shape[2], device=n_pad.device)
        self.pad = positions[None, :] < n_pad[:, None]

    def padding_mask(self, mask: Optional[torch.Tensor], start_pos: int, seqlen: int) -> torch.Tensor:
        """The (seqlen, keys) mask, or None for one new token, as (batch, 1, seqlen, keys) with the pads hidden
        from real tokens. Pads still see pads, so no row of the softmax is empty."""
        end = start_pos + seqlen
        allowed = ~self.pad[:, None, None, :end] | self.pad[:, None, start_pos:end, None]
        return allowed if mask is None else allowed & mask

    def kernels_for(self, model: "Transformer", tokens: torch.Tensor):
        """The matmul kernels a forward of `tokens` runs on: for a decoding step (one new token per row), the
        ones decoding_kernels measured fastest; for a prompt, PyTorch's defaults."""
        if tokens.shape[1] != 1:
            return contextlib.nullcontext()
        if self.kernels is None:
            self.kernels = decoding_kernels(model, tokens.shape[0])
            if self.kernels.transposed_output:
                self.output_t = model.output.weight.detach().t().contiguous()
        return self.kernels.active()

    def project(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """h @ weight.T: the output projection, from the (dim, vocab) copy in a decoding step where
        kernels_for measured that layout faster."""
        if self.output_t is not None and h.shape[1] == 1:
            return h @ self.output_t
        return F.linear(h, weight)

    def update(self, layer: int, start_pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (batch, n_kv_heads, seqlen, head_dim) at start_pos; return all keys and values so far."""
        end = start_pos + k.shape[2]
        self.k[layer][:, :, start_pos:end] = k
        self.v[layer][:, :, start_pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    """Multi-head causal self-attention with rotary embeddings; grouped-query when n_kv_heads < n_heads."""

    def __init__(self, args: ModelArgs, layer_id: int = 0):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.dropout = args.dropout

    def forward(self, x, start_pos, freqs_cis, mask, cache: Optional[KVCache] = None):
        bsz, seqlen, _ = x.shape
        q = self.wq(x).view(bsz, seqlen, self.n_heads, self.head_dim)
        k = self.wk(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        q, k = apply_rotary_emb(q, k, freqs_cis)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (batch, heads, seq, head_dim)
        if cache is not None:
            k, v = cache.update(self.layer_id, start_pos, k, v)
        # softmax(q k^T / sqrt(head_dim) + mask) v; each group of n_heads/n_kv_heads query heads shares one k, v.
        # mask CAUSAL: a fresh sequence, masked by SDPA's own is_causal (see attention_mask).
        is_causal = mask is CAUSAL
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=None if is_causal else mask, dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal, enable_gqa=self.n_kv_heads != self.n_heads,
        )
        return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))


class FeedForward(nn.Module):
    """SwiGLU feed-forward (Shazeer, 2020): w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # EXERCISE swiglu: gate w1(x) through SiLU, multiply by w3(x), project back down with w2
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
        # END EXERCISE


class TransformerBlock(nn.Module):
    """Pre-norm residual block: attention, then SwiGLU, each on an RMS-normalised input."""

    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args, layer_id)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.dropout = nn.Dropout(args.dropout)

    def forward(self, x, start_pos, freqs_cis, mask, cache=None):
        h = x + self.dropout(self.attention(self.attention_norm(x), start_pos, freqs_cis, mask, cache))
        return h + self.dropout(self.feed_forward(self.ffn_norm(h)))


class Transformer(nn.Module):
    """The LLaMA decoder: token ids (batch, seqlen) -> next-token logits (batch, seqlen, vocab_size)."""

    def __init__(self, params: ModelArgs):
        super().__init__()
        self.params = params
        self.tok_embeddings = nn.Embedding(params.vocab_size, params.dim)
        self.dropout = nn.Dropout(params.dropout)
        self.layers = nn.ModuleList(TransformerBlock(i, params) for i in range(params.n_layers))
        self.norm = RMSNorm(params.dim, eps=params.norm_eps)
        self.output = nn.Linear(params.dim, params.vocab_size, bias=False)
        if params.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # Not a parameter and not saved: recomputed from the config.
        self.register_buffer("freqs_cis", precompute_freqs_cis(params.head_dim, params.max_seq_len, params.rope_theta,
                                                                params.rope_scaling),
                             persistent=False)
        self.apply(self._init_weights)
        # Residual projections scaled by 1/sqrt(2 * n_layers) so the residual stream's variance does not
        # grow with depth (GPT-2, Radford et al., 2019).
        for name, p in self.named_parameters():
            if name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * params.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def _apply(self, fn, recurse=True):
        """nn.Module's, except that the rotary table only follows the device: model.to(torch.bfloat16) casts
        every floating-point buffer, and a complex one cast to a real dtype silently loses its imaginary part
        (and the rotation with it)."""
        freqs_cis = self._buffers.pop("freqs_cis")
        try:
            super()._apply(fn, recurse)
        finally:
            self._buffers["freqs_cis"] = freqs_cis.to(self.tok_embeddings.weight.device)
        return self

    def forward(self, tokens: torch.Tensor, start_pos: int = 0, cache: Optional[KVCache] = None) -> torch.Tensor:
        _bsz, seqlen = tokens.shape
        if start_pos + seqlen > self.params.max_seq_len:
            raise ValueError(f"positions up to {start_pos + seqlen} exceed max_seq_len={self.params.max_seq_len}")
        h = self.dropout(self.tok_embeddings(tokens))
        freqs_cis = self.freqs_cis[start_pos:start_pos + seqlen]
        mask = attention_mask(seqlen, start_pos, cache, tokens.device)
        # A decoding step runs on the matmul kernels the cache measured fastest for it on this machine.
        with cache.kernels_for(self, tokens) if cache is not None else contextlib.nullcontext():
            for layer in self.layers:
                h = layer(h, start_pos, freqs_cis, mask, cache)
            if cache is not None:  # the same product as self.output, with the matrix in the faster layout
                return cache.project(self.norm(h), self.output.weight)
            return self.output(self.norm(h))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # a tied matrix counts once

    def flops_per_token(self, seqlen: int) -> float:
        """Training FLOPs per token: 6N for the matmuls plus 12*L*dim*T for attention (PaLM, appendix B)."""
        # The embedding lookup costs no FLOPs; the output projection does (and is the same matrix when tied).
        n_matmul = self.num_params() - (0 if self.params.tie_embeddings else self.tok_embeddings.weight.numel())
        return 6 * n_matmul + 12 * self.params.n_layers * self.params.dim * seqlen


# ----------------------------------------------------------------------------------------------------
# Data: WikiText-2 -> GPT-2 token ids, one long 1-D stream per split


WIKITEXT_FILES = {"train": "wiki.train.raw", "validation": "wiki.valid.raw", "test": "wiki.test.raw"}


def load_tokenizer(name_or_path: str):
    """GPT-2's byte-level BPE tokenizer from the Hub ('gpt2') or from a local folder."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except Exception as e:  # OSError offline or for a bad path; ValueError for a folder of the wrong kind
        raise UserError(f"could not load the tokenizer '{name_or_path}' ({type(e).__name__}); offline, pass "
                        "--tokenizer DIR with vocab.json and merges.txt or tokenizer.json "
                        "(e.g. ../shared/data/gpt2-tokenizer)") from None
    if len(tokenizer) < 2:
        raise UserError(f"the tokenizer at '{name_or_path}' is empty; point --tokenizer at a folder with "
                        "tokenizer.json or vocab.json + merges.txt")
    return tokenizer


def load_wikitext(data_dir: Optional[str] = None, dataset: str = "Salesforce/wikitext",
                  config: str = "wikitext-2-raw-v1"):
    """The three splits as a datasets.DatasetDict with one 'text' row per line of the raw files."""
    from datasets import load_dataset

    if data_dir is not None:
        files = {split: Path(data_dir) / name for split, name in WIKITEXT_FILES.items()}
        for split, path in files.items():
            if not path.is_file():
                raise UserError(f"--data-dir {data_dir}: {path.name} is missing (the folder needs "
                                f"{', '.join(WIKITEXT_FILES.values())})")
            if path.stat().st_size == 0:
                raise UserError(f"--data-dir {data_dir}: {path.name} is empty")
        return load_dataset("text", data_files={k: str(v) for k, v in files.items()}, keep_linebreaks=True)
    try:
        return load_dataset(dataset, config)
    except Exception as e:  # ConnectionError when the Hub cannot be reached, DatasetNotFoundError, ...
        raise UserError(f"could not load {dataset}/{config} from the Hugging Face Hub ({type(e).__name__}); "
                        "offline, pass --data-dir DIR holding wiki.train.raw, wiki.valid.raw and wiki.test.raw "
                        "(e.g. ../shared/data/wikitext-2-raw-local)") from None


def tokenize_splits(raw, tokenizer, add_special_tokens: bool = True) -> dict[str, torch.Tensor]:
    """Tokenize every split in batches and concatenate it into one stream of int32 token ids.

    datasets caches the result of .map on disk, keyed by the data and the tokenizer, so a second run with
    the same files skips the tokenizer entirely.
    """

    def encode(batch):
        return {"ids": tokenizer(batch["text"], add_special_tokens=add_special_tokens, verbose=False)["input_ids"]}

    tokenized = raw.map(encode, batched=True, batch_size=1000, remove_columns=["text"], desc="tokenizing")
    streams = {}
    for split, ds in tokenized.items():
        ids = ds.with_format("arrow")["ids"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
        if len(ids) < 2:
            raise UserError(f"the {split} split holds fewer than 2 tokens; is its file empty?")
        streams[split] = torch.from_numpy(ids.astype("int32"))
    return streams


def bos_ids(tokenizer) -> list[int]:
    """The tokens the tokenizer puts before any text on its own (Llama's BOS; nothing for GPT-2's)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    starts = [i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain]
    return full[:starts[0]] if starts else []


def train_batches(tokens: torch.Tensor, seq_len: int, batch_size: int, generator: torch.Generator,
                  skip: int = 0):
    """Endless (inputs, targets) batches of contiguous windows; no padding anywhere.

    Each pass over the data starts at a random offset and cuts the stream into windows of seq_len + 1
    tokens that overlap by one (targets are inputs shifted left), visited in a random order.
    A resumed run passes skip = the batches already drawn: their randomness is drawn again, their windows not
    gathered, so the next batch is the one the stopped run would have drawn next.
    """
    n_windows = (len(tokens) - 1) // seq_len
    if n_windows < 1:
        raise UserError(f"the training split ({len(tokens)} tokens) is shorter than one window of "
                        f"max_seq_len + 1 = {seq_len + 1} tokens")
    batch_size = min(batch_size, n_windows)
    while True:
        spare = len(tokens) - 1 - n_windows * seq_len
        offset = int(torch.randint(0, spare + 1, (1,), generator=generator))
        starts = offset + seq_len * torch.randperm(n_windows, generator=generator)
        for i in range(0, n_windows - batch_size + 1, batch_size):  # the few left over come next pass
            if skip:
                skip -= 1
                continue
            idx = starts[i:i + batch_size, None] + torch.arange(seq_len + 1)
            window = tokens[idx].long()
            yield window[:, :-1], window[:, 1:]


def eval_windows(tokens: torch.Tensor, seq_len: int) -> list[torch.Tensor]:
    """Cut a split into consecutive windows of up to seq_len + 1 tokens overlapping by one, so every
    token after the first is predicted exactly once. The last window may be shorter."""
    return [tokens[s:s + seq_len + 1].long() for s in range(0, len(tokens) - 1, seq_len)]


# ----------------------------------------------------------------------------------------------------
# Training and evaluation


@dataclass
class TrainConfig:
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    label_smoothing: float = 0.0
    grad_clip: float = 1.0
    max_steps: Optional[int] = None
    time_budget: Optional[float] = None  # minutes
    eval_interval: int = 200
    seed: int = 1337

    def __post_init__(self):
        for name in ("batch_size", "grad_accum", "eval_interval"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise UserError(f"need 0 <= min_lr <= lr and lr > 0, got lr={self.lr}, min_lr={self.min_lr}")
        if not 0 <= self.label_smoothing < 1:
            raise UserError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.grad_clip <= 0:
            raise UserError("warmup steps and weight decay must be >= 0, the gradient clip > 0")
        if self.max_steps is not None and self.max_steps < 1:
            raise UserError(f"--max-steps must be at least 1, got {self.max_steps}")
        if self.time_budget is not None and self.time_budget <= 0:
            raise UserError(f"--time-budget must be a positive number of minutes, got {self.time_budget}")
        if self.max_steps is None and self.time_budget is None:
            raise UserError("give a --max-steps or a --time-budget (or both)")


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """The training loss: mean next-token cross-entropy over every position of the batch, optionally against
    targets smoothed towards the uniform distribution (Szegedy et al. 2016)."""
    return ChunkedCrossEntropy.apply(logits.flatten(0, 1), targets.flatten(), label_smoothing)


def learning_rate(step: int, progress: float, cfg: TrainConfig) -> float:
    """Linear warmup over warmup_steps, then cosine decay from lr to min_lr as progress goes 0 -> 1."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def configure_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on the matrices only; norms' gains are not decayed."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


@torch.no_grad()
def evaluate(model: Transformer, tokens: torch.Tensor, device: torch.device,
             precision: Optional[Precision] = None, batch_size: int = 16) -> float:
    """Mean negative log-likelihood per token of a whole split; perplexity is its exp."""
    was_training = model.training
    model.eval()
    windows = eval_windows(tokens, model.params.max_seq_len)
    full = [w for w in windows if len(w) == len(windows[0])]
    groups = [torch.stack(full[i:i + batch_size]) for i in range(0, len(full), batch_size)]
    groups += [w[None] for w in windows if len(w) != len(windows[0])]
    total, count = 0.0, 0
    for batch in groups[trainkit.shard_rows(len(groups))]:  # under torchrun each process takes every N-th
        batch = batch.to(device)
        with precision.autocast() if precision else contextlib.nullcontext():
            logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
        total, count = total + loss.item(), count + batch[:, 1:].numel()
    total, count = trainkit.all_reduce([total, count])  # the sums over all processes' batches
    model.train(was_training)
    return total / count


@torch.no_grad()
def sample(model: Transformer, tokenizer, prompt: str, device: torch.device, max_new_tokens: int = 40,
           temperature: float = 0.8, top_k: int = 40, seed: int = 0) -> str:
    """A quick look at what the model writes (top-k sampling with the KV cache); see llama_generation.py."""
    model.eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    ids = tokenizer(prompt)["input_ids"][-model.params.max_seq_len // 2:]
    tokens = torch.tensor([ids], device=device)
    cache = KVCache(model.params, 1, device, model.output.weight.dtype)
    logits = model(tokens, 0, cache)[:, -1]
    out = []
    for pos in range(len(ids), min(len(ids) + max_new_tokens, model.params.max_seq_len)):
        logits = logits / temperature
        logits[logits < torch.topk(logits, top_k).values[:, -1:]] = -float("inf")
        nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
        out.append(nxt.item())
        logits = model(nxt, pos, cache)[:, -1]
    return prompt + tokenizer.decode(out)


def save_checkpoint(path: str, model: Transformer, tokenizer_name: str, **extra) -> None:
    """state_dict + ModelArgs + tokenizer, written to a temporary file and renamed: never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt = {"model": model.state_dict(), "model_args": asdict(model.params), "tokenizer": tokenizer_name, **extra}
    trainkit.atomic_save(ckpt, path)


def read_checkpoint(path: str, device="cpu") -> dict:
    """torch.load with weights_only=True (tensors and plain values only), with one-line errors."""
    if not Path(path).is_file():
        raise UserError(f"no checkpoint at {path}; train one first with `python llama.py` "
                        "(offline: add --data-dir DIR --tokenizer DIR)")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise UserError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__})") from None


def build_model(model_args: dict, state_dict: dict, source: str = "the checkpoint") -> Transformer:
    """A Transformer of the given ModelArgs holding the given weights."""
    known = {f.name for f in fields(ModelArgs)}
    model = Transformer(ModelArgs(**{k: v for k, v in model_args.items() if k in known}))
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        raise UserError(f"{source}: the weights do not fit the model's arguments ({str(e).splitlines()[1].strip()[:160]})") from None
    return model


def load_checkpoint(path: str, device="cpu") -> tuple[Transformer, dict]:
    """Rebuild the model from the ModelArgs stored beside its weights."""
    ckpt = read_checkpoint(path, device)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        raise UserError(f"{path} holds no 'model' and 'model_args'; was it saved by llama.py?")
    return build_model(ckpt["model_args"], ckpt["model"], path).to(device), ckpt


def train(model: Transformer, streams: dict, cfg: TrainConfig, device: torch.device, precision: Precision,
          on_best=None, on_last=None, resume: Optional[dict] = None, on_validate=None) -> dict:
    """Train until max_steps or the time budget, validating every eval_interval steps.

    on_best(model, val_loss) is called whenever the validation loss improves, on_last(state) every eval_interval
    steps and when training stops, with everything a resumed run needs (the caller saves both). `resume` is
    such a state: training continues exactly where it stopped. Under torchrun every process runs this with its
    share of each batch (trainkit.local_share); the processes agree on when to stop. on_validate(log) is called
    after every validation (the caller redraws the loss curves). Returns what happened: status ("completed",
    "interrupted" or "nan"), losses, counts and times, and the curves (tokens seen, loss) of every step
    ("train_curve") and every validation ("val_curve").
    """
    from tqdm.auto import tqdm

    generator = torch.Generator().manual_seed(cfg.seed)
    skip = resume["batches_drawn"] if resume else 0
    batches = train_batches(streams["train"], model.params.max_seq_len, cfg.batch_size, generator, skip)
    optimizer = configure_optimizer(model, cfg)
    scaler = precision.grad_scaler()  # fp16 only: loss scaling; for fp32 and bf16 it passes calls through
    log = {"status": "completed", "steps": 0, "tokens_seen": 0, "train_time_s": 0.0, "elapsed_s": 0.0,
           "best_val_loss": math.inf, "best_step": 0, "recent_losses": [], "val_history": [], "signal": 0,
           "train_curve": [], "val_curve": []}
    step = 0
    if resume:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        if resume["scaler"] and scaler.is_enabled():
            scaler.load_state_dict(resume["scaler"])
        log.update(resume["log"], status="completed", signal=0)
        step = resume["step"]
        trainkit.set_rng_state(resume["rng"])
    ddp_model = trainkit.wrap_ddp(model, device)  # under torchrun: averages the gradients over the processes
    model.train()

    def validate(step):
        val = evaluate(model, streams["validation"], device, precision)  # the same figure on every process
        log["val_history"].append((step, val))
        log["val_curve"].append((log["tokens_seen"], val))
        tqdm.write(f"step {step}: validation loss {val:.3f}, perplexity {math.exp(val):.1f}")
        if val < log["best_val_loss"]:
            log["best_val_loss"], log["best_step"] = val, step
            if on_best is not None:
                on_best(model, val)
        if on_validate is not None:
            on_validate(log)
        model.train()

    def snapshot():
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "step": step, "batches_drawn": step * cfg.grad_accum, "log": dict(log), "rng": trainkit.rng_state()}

    clock = time.perf_counter() - log["elapsed_s"]  # a resumed run's clock starts where the stopped one ended
    start, elapsed = time.perf_counter(), log["elapsed_s"]
    stop = trainkit.StopRequest().install()  # until stop.remove(): SIGINT and SIGTERM only raise a flag
    bar = tqdm(total=100, unit="%", bar_format="{l_bar}{bar}| {elapsed}<{remaining} {postfix}",
               disable=not trainkit.is_main())
    try:
        while True:
            progress = max(step / cfg.max_steps if cfg.max_steps else 0.0,
                           elapsed / (60 * cfg.time_budget) if cfg.time_budget else 0.0)
            if progress >= 1.0 or log["signal"]:
                break
            lr = learning_rate(step, progress, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            t0, loss_sum = time.perf_counter(), 0.0
            for micro in range(cfg.grad_accum):
                inputs, targets = trainkit.local_share(*next(batches))  # this process's rows of the batch
                inputs, targets = inputs.to(device), targets.to(device)
                with trainkit.sync_gradients(ddp_model, now=micro == cfg.grad_accum - 1):
                    with precision.autocast():
                        logits = ddp_model(inputs)
                    loss = cross_entropy(logits, targets, cfg.label_smoothing)
                    scaler.scale(loss / cfg.grad_accum).backward()
                loss_sum += loss.item() / cfg.grad_accum
            # Agreed by all processes: the loss (a NaN anywhere stops all), the time (the first to reach
            # the budget stops all) and a stop signal received by any of them.
            (loss_sum,) = trainkit.all_reduce([loss_sum / trainkit.world_size()])
            elapsed, signum = trainkit.all_reduce([time.perf_counter() - clock, stop.signum], op="max")
            if not math.isfinite(loss_sum):
                log["status"] = "nan"
                tqdm.write(f"step {step}: the loss is {loss_sum}; stopping (the last good checkpoint is kept)")
                break
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)  # fp16: skipped when a gradient overflowed (the scale then shrinks)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            log["train_time_s"] += time.perf_counter() - t0
            log["elapsed_s"], log["signal"] = elapsed, int(signum)
            log["tokens_seen"] += cfg.grad_accum * inputs.numel() * trainkit.world_size()
            log["recent_losses"] = (log["recent_losses"] + [loss_sum])[-50:]
            log["train_curve"].append((log["tokens_seen"], loss_sum))
            bar.n = round(100 * progress, 1)
            bar.set_postfix_str(f"step {step} loss {loss_sum:.3f} lr {lr:.2e} "
                                f"{log['tokens_seen'] / log['train_time_s']:.0f} tok/s")
            if step % cfg.eval_interval == 0:
                validate(step)
                if on_last is not None:
                    on_last(snapshot())
    except KeyboardInterrupt:  # a second Ctrl-C, in the middle of a step: no resumable state
        log["status"] = "interrupted"
        tqdm.write("interrupted: evaluating and saving what was trained so far")
    finally:
        stop.remove()
        bar.close()
    log["steps"] = step
    if log["signal"]:  # SIGTERM or Ctrl-C: save where it stopped; validation waits for the resumed run
        log["status"] = "interrupted"
    elif step > 0 and log["status"] != "nan" and (not log["val_history"] or log["val_history"][-1][0] != step):
        validate(step)
    if on_last is not None and log["status"] != "nan" and (log["signal"] or log["status"] == "completed"):
        on_last(snapshot())
    log["wall_time_s"] = time.perf_counter() - start
    return log


# ----------------------------------------------------------------------------------------------------
# Real weights: Hugging Face Llama checkpoints into our Transformer, and ours out in their format
#
# Our names are Meta's; Hugging Face's LlamaForCausalLM holds the same tensors under other names, with one
# real difference: the rows of wq and wk. Meta's rotary embedding rotates adjacent channel pairs (0, 1),
# (2, 3), ... of each head; Hugging Face's rotates the two halves against each other: (0, d/2), (1, d/2 + 1),
# ... Its conversion script reorders the rows of wq and wk once, per head, so that rotate-half on the
# reordered rows computes what the interleaved rotation computes on the original ones. Importing undoes that
# reordering. wk has n_kv_heads heads, not n_heads: permuting it with n_heads is the classic GQA bug (it only
# shows when the two differ).

HF_LAYER_NAMES = {  # ours (after "layers.{i}.") -> Hugging Face's (after "model.layers.{i}.")
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
HF_TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"}


def hf_names(n_layers: int) -> dict[str, str]:
    """Every tensor of our Transformer -> its name in a LlamaForCausalLM state_dict."""
    names = dict(HF_TOP_NAMES)
    for i in range(n_layers):
        names.update({f"layers.{i}.{ours}": f"model.layers.{i}.{theirs}" for ours, theirs in HF_LAYER_NAMES.items()})
    return names


def hf_to_meta_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of each head from HF's halves layout [x_0 .. x_{d/2-1}, y_0 .. y_{d/2-1}] back to Meta's
    interleaved pairs [x_0, y_0, x_1, y_1, ...]: view each head as (2, d/2), swap to (d/2, 2), flatten."""
    out_dim, in_dim = w.shape
    return w.reshape(n_heads, 2, out_dim // n_heads // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def meta_to_hf_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of hf_to_meta_rotary: each head's (d/2, 2) pairs become (2, d/2) halves."""
    out_dim, in_dim = w.shape
    return w.reshape(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def from_hf_state_dict(hf_state: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """A LlamaForCausalLM state_dict as ours: renamed, wq/wk rows back to interleaved pairs, shapes checked.

    A tied checkpoint may lack lm_head.weight; the output then is the embedding, as in our tied model.
    """
    ours = {}
    for name, hf_name in hf_names(args.n_layers).items():
        if hf_name not in hf_state:
            if name == "output.weight" and args.tie_embeddings:
                hf_name = HF_TOP_NAMES["tok_embeddings.weight"]
            else:
                raise UserError(f"the checkpoint has no {hf_name}; is it a complete LlamaForCausalLM?")
        w = hf_state[hf_name]
        if name.endswith("attention.wq.weight"):
            w = hf_to_meta_rotary(w, args.n_heads)
        elif name.endswith("attention.wk.weight"):
            w = hf_to_meta_rotary(w, args.n_kv_heads)  # n_kv_heads: the GQA pitfall
        ours[name] = w
    for name, w in ours.items():
        shape = expected_shape(name, args)
        if tuple(w.shape) != shape:
            raise UserError(f"{name} has shape {tuple(w.shape)} in the checkpoint, the config says {tuple(shape)}")
    return ours


def expected_shape(name: str, args: ModelArgs) -> tuple[int, ...]:
    """The shape of one of our tensors, from the config alone."""
    top = {"tok_embeddings.weight": (args.vocab_size, args.dim), "norm.weight": (args.dim,),
           "output.weight": (args.vocab_size, args.dim)}
    if name in top:
        return top[name]
    kv, hidden = args.n_kv_heads * args.head_dim, args.hidden_dim
    shapes = {"attention.wq.weight": (args.dim, args.dim), "attention.wk.weight": (kv, args.dim),
              "attention.wv.weight": (kv, args.dim), "attention.wo.weight": (args.dim, args.dim),
              "feed_forward.w1.weight": (hidden, args.dim), "feed_forward.w2.weight": (args.dim, hidden),
              "feed_forward.w3.weight": (hidden, args.dim), "attention_norm.weight": (args.dim,),
              "ffn_norm.weight": (args.dim,)}
    return shapes[name.split(".", 2)[2]]


def to_hf_state_dict(state: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Our state_dict as a LlamaForCausalLM's (contiguous tensors, ready for safetensors). Tied: no lm_head,
    as Hugging Face saves tied models; from_pretrained ties it back to the embedding."""
    hf = {}
    for name, hf_name in hf_names(args.n_layers).items():
        if name == "output.weight" and args.tie_embeddings:
            continue
        w = state[name].detach()
        if name.endswith("attention.wq.weight"):
            w = meta_to_hf_rotary(w, args.n_heads)
        elif name.endswith("attention.wk.weight"):
            w = meta_to_hf_rotary(w, args.n_kv_heads)
        hf[hf_name] = w.contiguous().clone()
    return hf


def model_args_from_hf_config(config, max_seq_len: Optional[int] = None) -> ModelArgs:
    """ModelArgs for a transformers LlamaConfig; anything our model does not implement is refused.

    max_seq_len caps max_position_embeddings: the rotary table and each generation's KV cache hold that many
    positions, and a Llama 3.2 allows 131,072 (4 GiB of KV cache for the 1B model in bf16).
    """
    architectures = getattr(config, "architectures", None) or ["LlamaForCausalLM"]
    if config.model_type != "llama" or "LlamaForCausalLM" not in architectures:
        raise UserError(f"this is a '{config.model_type}' model ({', '.join(architectures)}); only Llama-architecture "
                        "checkpoints (LlamaForCausalLM) load into our Transformer")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    unsupported = [(config.hidden_act != "silu", f"hidden_act '{config.hidden_act}' (ours is SiLU)"),
                   (bool(getattr(config, "attention_bias", False)), "attention biases"),
                   (bool(getattr(config, "mlp_bias", False)), "MLP biases"),
                   (head_dim * config.num_attention_heads != config.hidden_size,
                    f"head_dim {head_dim} other than hidden_size / num_attention_heads")]
    for bad, what in unsupported:
        if bad:
            raise UserError(f"this Llama checkpoint has {what}, which our Transformer does not implement")
    rope = dict(getattr(config, "rope_parameters", None) or {})
    kind = rope.get("rope_type", rope.get("type", "default"))
    scaling = None
    if kind != "default":
        scaling = {"rope_type": kind, **{k: rope[k] for k in LLAMA3_SCALING_KEYS if k in rope}}
        check_rope_scaling(scaling)
    positions = config.max_position_embeddings
    if max_seq_len is not None:
        if max_seq_len < 2:
            raise UserError(f"--max-seq-len must be at least 2, got {max_seq_len}")
        positions = min(positions, max_seq_len)
    return ModelArgs(dim=config.hidden_size, n_layers=config.num_hidden_layers, n_heads=config.num_attention_heads,
                     n_kv_heads=config.num_key_value_heads, vocab_size=config.vocab_size,
                     ffn_hidden_dim=config.intermediate_size, norm_eps=config.rms_norm_eps,
                     rope_theta=float(rope.get("rope_theta", 10000.0)), max_seq_len=positions, dropout=0.0,
                     tie_embeddings=bool(config.tie_word_embeddings), rope_scaling=scaling)


def hf_config_from_model_args(args: ModelArgs, tokenizer=None):
    """The LlamaConfig of our model, for export (max_position_embeddings: the context it was trained on)."""
    from transformers import LlamaConfig

    rope = {"rope_type": "default", "rope_theta": args.rope_theta}
    if args.rope_scaling is not None:
        rope.update(args.rope_scaling, rope_theta=args.rope_theta)
    special = {}
    if tokenizer is not None:
        special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    return LlamaConfig(vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.hidden_dim,
                       num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
                       num_key_value_heads=args.n_kv_heads, max_position_embeddings=args.max_seq_len,
                       rms_norm_eps=args.norm_eps, rope_parameters=rope, tie_word_embeddings=args.tie_embeddings,
                       attention_bias=False, mlp_bias=False, hidden_act="silu",
                       architectures=["LlamaForCausalLM"], **special)


def read_hf_config(name_or_dir: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name_or_dir)
    except Exception as e:  # OSError offline or for a missing folder, ValueError for an unknown model type
        raise UserError(f"could not read the config of '{name_or_dir}' ({type(e).__name__}: "
                        f"{(str(e).splitlines() or [''])[0][:120]}); give a Hub name, or offline a local folder "
                        "holding config.json and the weights") from None


def inference_dtype(device: torch.device, checkpoint_dtype: torch.dtype, args: ModelArgs) -> tuple[torch.dtype, str]:
    """The checkpoint's own dtype where this device computes in it fast, float32 otherwise; and why.

    The precision policy (trainkit.choose_precision) decides what is fast: on CUDA by compute capability, on
    a CPU by timing a matmul shaped like a batch of tokens through the first feed-forward layer.
    """
    if checkpoint_dtype not in (torch.bfloat16, torch.float16):
        return torch.float32, f"the checkpoint is {str(checkpoint_dtype).removeprefix('torch.')}"
    fast = choose_precision("auto", device, (256, args.dim, args.hidden_dim))
    name = str(checkpoint_dtype).removeprefix("torch.")
    if fast.dtype == checkpoint_dtype:
        return checkpoint_dtype, f"the checkpoint's {name}, fast here: {fast.reason}"
    return torch.float32, f"the checkpoint is {name}, but {fast.name} is what is fast here ({fast.reason})"


def load_hf_model(name_or_dir: str, device, max_seq_len: Optional[int] = None,
                  dtype: Optional[torch.dtype] = None) -> tuple[Transformer, str]:
    """Any LlamaForCausalLM checkpoint (Hub name or local folder) in our Transformer; returns it and the dtype
    choice explained. transformers reads the files (safetensors, shards, downloads); we only convert.

    dtype None: the checkpoint's own where the device is fast in it, else float32 (inference_dtype).
    """
    from transformers import LlamaForCausalLM

    args = model_args_from_hf_config(read_hf_config(name_or_dir), max_seq_len)
    try:
        hf = LlamaForCausalLM.from_pretrained(name_or_dir, dtype="auto")
    except Exception as e:
        raise UserError(f"could not load the weights of '{name_or_dir}' ({type(e).__name__}: "
                        f"{(str(e).splitlines() or [''])[0][:120]})") from None
    hf_state = hf.state_dict()
    checkpoint_dtype = hf_state["model.embed_tokens.weight"].dtype
    why = f"dtype {str(dtype).removeprefix('torch.')}, as asked"
    if dtype is None:
        dtype, why = inference_dtype(torch.device(device), checkpoint_dtype, args)
    ours = {k: v.to(dtype) for k, v in from_hf_state_dict(hf_state, args).items()}
    del hf, hf_state
    return model_from_weights(args, ours).to(device).eval(), why


def model_from_weights(args: ModelArgs, state: dict[str, torch.Tensor]) -> Transformer:
    """A Transformer that takes these tensors as its parameters, without first allocating and randomly
    initialising its own (for a 1B model that would cost 5 GB and seconds): it is built on the "meta" device
    (shapes only), then load_state_dict(assign=True) puts the tensors in place."""
    with torch.device("meta"):
        model = Transformer(args)
    model.load_state_dict(state, assign=True)
    if args.tie_embeddings:  # assign gave the two names two Parameter objects: make them one again
        model.output.weight = model.tok_embeddings.weight
    # The rotary table is no parameter (and complex): compute it for real, in float32 whatever the weights' dtype.
    model.freqs_cis = precompute_freqs_cis(args.head_dim, args.max_seq_len, args.rope_theta, args.rope_scaling)
    return model


def export_hf(model: Transformer, tokenizer, out_dir: str) -> list[str]:
    """Write config.json, model.safetensors and the tokenizer's files, so that
    LlamaForCausalLM.from_pretrained(out_dir) and pipeline("text-generation", model=out_dir) run our model.

    Everything is written to a temporary folder first, then each file is moved into out_dir with os.replace,
    so an interrupted export never leaves a half-written file.
    """
    import tempfile

    from safetensors.torch import save_file

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--export-hf {out_dir}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".export-") as tmp:
        config = hf_config_from_model_args(model.params, tokenizer)
        config.dtype = torch.float32
        config.save_pretrained(tmp)
        weights = {k: v.float().cpu() for k, v in to_hf_state_dict(model.state_dict(), model.params).items()}
        save_file(weights, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        written = sorted(os.listdir(tmp))
        for name in written:
            os.chmod(os.path.join(tmp, name), 0o644)  # readable like any saved model (the temp folder's are private)
            os.replace(os.path.join(tmp, name), out / name)
    return written


# ----------------------------------------------------------------------------------------------------
# Command line

# Each preset fills the flags that are not given. "default" is tuned for a 2-core laptop CPU in 15 minutes.
PRESETS = {
    "smoke": dict(dim=32, n_layers=1, n_heads=2, n_kv_heads=None, max_seq_len=32, dropout=0.0,
                  batch_size=4, grad_accum=1, lr=3e-3, warmup_steps=1, weight_decay=0.1, label_smoothing=0.0,
                  max_steps=4, time_budget=None, eval_interval=2, sample_tokens=8),
    # On the 210k-token local stand-in, validation perplexity bottoms out after ~3-5 epochs whatever the size
    # or dropout (see the README's table): ~5 epochs in 1000 small, noisy steps with the cosine decay finished
    # by then beat spending the whole 15 minutes, which stays as a cap for slower machines. Label smoothing
    # keeps some probability on tokens the training text never shows (6% of the validation tokens).
    "default": dict(dim=256, n_layers=4, n_heads=8, n_kv_heads=None, max_seq_len=128, dropout=0.2,
                    batch_size=8, grad_accum=1, lr=2e-3, warmup_steps=100, weight_decay=0.1,
                    label_smoothing=0.1, max_steps=1000, time_budget=15.0,
                    eval_interval=100, sample_tokens=40),
    "gpu": dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=None, max_seq_len=512, dropout=0.1,
                batch_size=32, grad_accum=1, lr=1e-3, warmup_steps=200, weight_decay=0.1,
                label_smoothing=0.0, max_steps=None, time_budget=30.0,
                eval_interval=250, sample_tokens=60),
}


def pick_device(name: str) -> torch.device:
    if name != "auto":
        if name == "cuda" and not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA GPU is visible")
        if name == "mps" and not torch.backends.mps.is_available():
            raise UserError("--device mps: Apple's MPS backend is not available")
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_precision(flag: str, device: torch.device, params: ModelArgs, batch_size: int) -> Precision:
    """--precision on this device, printed; auto times a matmul shaped like the model's (a batch of tokens
    through the feed-forward's first layer), see trainkit.choose_precision."""
    tokens = min(batch_size * params.max_seq_len, 2048)
    precision = choose_precision(flag, device, (tokens, params.dim, params.hidden_dim))
    print(precision.describe())
    return precision


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train a small LLaMA on WikiText-2 and report its perplexity.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=PRESETS, default="default",
                   help="model and training sizes; any flag below overrides its value")
    d = p.add_argument_group("data")
    d.add_argument("--data-dir", help="local folder with wiki.{train,valid,test}.raw instead of the Hub")
    d.add_argument("--dataset", default="Salesforce/wikitext", help="Hub dataset (used without --data-dir)")
    d.add_argument("--dataset-config", default="wikitext-2-raw-v1")
    d.add_argument("--tokenizer", default=None, help="Hub name or local folder (default: gpt2, or the checkpoint's)")
    m = p.add_argument_group("model (default: the preset's)")
    m.add_argument("--dim", type=int)
    m.add_argument("--n-layers", type=int)
    m.add_argument("--n-heads", type=int)
    m.add_argument("--n-kv-heads", type=int, help="fewer than --n-heads for grouped-query attention")
    m.add_argument("--max-seq-len", type=int, help="context length trained on (with --hf-model: the evaluation "
                   "window, default the model's max_position_embeddings up to 1024)")
    m.add_argument("--dropout", type=float)
    t = p.add_argument_group("training (default: the preset's)")
    t.add_argument("--batch-size", type=int, help="windows per micro-batch, over all processes: under torchrun "
                   "each of N processes takes batch-size/N of them")
    t.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step; a step sees batch-size x "
                   "grad-accum windows however many processes share them")
    t.add_argument("--lr", type=float, help="peak learning rate")
    t.add_argument("--warmup-steps", type=int)
    t.add_argument("--weight-decay", type=float, help="AdamW's decoupled weight decay on the matrices")
    t.add_argument("--label-smoothing", type=float, help="share of each target spread over the vocabulary")
    t.add_argument("--max-steps", type=int)
    t.add_argument("--time-budget", type=float, metavar="MINUTES")
    t.add_argument("--eval-interval", type=int, help="validate every this many steps")
    t.add_argument("--seed", type=int, default=1337)
    t.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto")
    t.add_argument("--precision", "--dtype", choices=PRECISIONS, default="auto",
                   help="autocast precision. auto: on CUDA bf16 from compute capability 8.0, fp16 with loss "
                        "scaling on 7.x; on a CPU whichever of fp32 and bf16 measures faster; fp32 on MPS")
    o = p.add_argument_group("output")
    o.add_argument("--checkpoint", default=CHECKPOINT, help="where the trained model is saved (or read)")
    o.add_argument("--output-dir", default="runs/llama", help="where metrics.json and loss_curves.png are written")
    o.add_argument("--eval-only", action="store_true", help="evaluate --checkpoint on --split, no training")
    o.add_argument("--resume", action="store_true",
                   help="continue the run saved in the last checkpoint beside --checkpoint (NAME.last.pth), with "
                        "the same model and training flags; --max-steps, --time-budget, --eval-interval may change")
    o.add_argument("--split", choices=list(WIKITEXT_FILES), default="test", help="split for --eval-only")
    r = p.add_argument_group("real weights (Hugging Face Llama checkpoints)")
    r.add_argument("--hf-model", metavar="NAME_OR_DIR", help="with --eval-only: evaluate any LlamaForCausalLM "
                   "checkpoint (Hub name or local folder) in our Transformer, with its own tokenizer")
    r.add_argument("--export-hf", metavar="DIR", help="write --checkpoint as a Hugging Face Llama (config.json, "
                   "model.safetensors, the tokenizer) to DIR, for from_pretrained and pipeline")
    args = p.parse_args(argv)
    args.hf_max_seq_len = args.max_seq_len  # before the preset fills it: --hf-model's window only if given
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def report(metrics: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics, indent=2) + "\n")
    print("\n" + "-" * 60)
    for key, value in metrics.items():
        if key != "samples":
            print(f"{key:>22}: {value:.4g}" if isinstance(value, float) else f"{key:>22}: {value}")
    for text in metrics.get("samples", []):
        print(f"\n--- sample ---\n{text}")
    print(f"\nmetrics written to {path}")


def run_eval_only(args, device) -> int:
    model, ckpt = load_checkpoint(args.checkpoint, device)
    precision = pick_precision(args.precision, device, model.params, 16)
    tokenizer = load_tokenizer(args.tokenizer or ckpt.get("tokenizer") or "gpt2")
    if len(tokenizer) > model.params.vocab_size:
        raise UserError(f"the tokenizer has {len(tokenizer)} tokens but the checkpoint's model only "
                        f"{model.params.vocab_size}; pass the --tokenizer it was trained with")
    raw = load_wikitext(args.data_dir, args.dataset, args.dataset_config)
    tokens = tokenize_splits(raw, tokenizer)[args.split]
    loss = evaluate(model, tokens, device, precision)
    report({"checkpoint": args.checkpoint, "split": args.split, "tokens": len(tokens) - 1,
            f"{args.split}_loss": loss, f"{args.split}_perplexity": math.exp(loss)},
           Path(args.output_dir) / f"eval_{args.split}.json")
    return 0


def run_eval_hf(args, device) -> int:
    """Perplexity of a real checkpoint on WikiText. Its tokenizer's special tokens (a BOS on every line, for
    Llama 3) are left out of the stream; the BOS it puts before a text starts the stream, once."""
    cap = args.hf_max_seq_len if args.hf_max_seq_len is not None else 1024
    model, why = load_hf_model(args.hf_model, device, cap)
    print(f"{args.hf_model}: {model.num_params() / 1e6:.1f}M parameters, {model.output.weight.dtype} ({why}), "
          f"windows of {model.params.max_seq_len} tokens")
    tokenizer = load_tokenizer(args.hf_model)
    raw = load_wikitext(args.data_dir, args.dataset, args.dataset_config)
    tokens = tokenize_splits(raw, tokenizer, add_special_tokens=False)[args.split]
    tokens = torch.cat([torch.tensor(bos_ids(tokenizer), dtype=tokens.dtype), tokens])
    batch_size = max(1, 2048 // model.params.max_seq_len)  # about 2,048 tokens of logits at a time
    loss = evaluate(model, tokens, device, None, batch_size)
    report({"hf_model": args.hf_model, "split": args.split, "tokens": len(tokens) - 1,
            "window": model.params.max_seq_len, "dtype": str(model.output.weight.dtype).removeprefix("torch."),
            f"{args.split}_loss": loss, f"{args.split}_perplexity": math.exp(loss)},
           Path(args.output_dir) / f"eval_{args.split}.json")
    return 0


def run_export_hf(args, device) -> int:
    model, ckpt = load_checkpoint(args.checkpoint, "cpu")
    tokenizer = load_tokenizer(args.tokenizer or ckpt.get("tokenizer") or "gpt2")
    if len(tokenizer) > model.params.vocab_size:
        raise UserError(f"the tokenizer has {len(tokenizer)} tokens but the checkpoint's model only "
                        f"{model.params.vocab_size}; pass the --tokenizer it was trained with")
    written = export_hf(model, tokenizer, args.export_hf)
    print(f"wrote {', '.join(written)} to {args.export_hf}; load it with "
          f"LlamaForCausalLM.from_pretrained({args.export_hf!r}) or pipeline('text-generation', model=...)")
    return 0


def run_training(args, device) -> int:
    tokenizer_name = args.tokenizer or "gpt2"
    if Path(tokenizer_name).is_dir():  # recorded in the checkpoint: make it work from any folder
        tokenizer_name = str(Path(tokenizer_name).resolve())
    tokenizer = load_tokenizer(tokenizer_name)
    cfg = TrainConfig(batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                      min_lr=args.lr / 10, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
                      label_smoothing=args.label_smoothing, max_steps=args.max_steps,
                      time_budget=args.time_budget, eval_interval=args.eval_interval, seed=args.seed)
    torch.manual_seed(args.seed)
    params = ModelArgs(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
                       vocab_size=len(tokenizer), max_seq_len=args.max_seq_len, dropout=args.dropout)
    t0 = time.perf_counter()
    with trainkit.main_first():  # under torchrun: one process tokenizes into the datasets cache, the others read it
        streams = tokenize_splits(load_wikitext(args.data_dir, args.dataset, args.dataset_config), tokenizer)
    data_time = time.perf_counter() - t0
    model = Transformer(params).to(device)
    try:
        local_batch = trainkit.per_process_batch(cfg.batch_size)
    except ValueError as e:
        raise UserError(str(e)) from None
    # Measured on rank 0 and used by all: every process must compute in the same precision.
    precision = trainkit.same_on_all(pick_precision(args.precision, device, params, local_batch))
    print(f"device {device}, {precision.name}; {model.num_params() / 1e6:.1f}M parameters; "
          f"tokens: " + ", ".join(f"{k} {len(v)}" for k, v in streams.items()) + f" (loaded in {data_time:.1f}s)")
    print(f"batch: {cfg.batch_size * cfg.grad_accum} windows per step (batch {cfg.batch_size} x grad-accum "
          f"{cfg.grad_accum}), {trainkit.world_size()} process(es) x {local_batch} windows per micro-batch")
    last_path = trainkit.last_checkpoint_path(args.checkpoint)
    state = read_resume_state(last_path, params, cfg) if args.resume else None

    def on_best(m, val_loss):
        save_checkpoint(args.checkpoint, m, tokenizer_name, val_loss=val_loss)

    def on_last(snapshot):
        trainkit.atomic_save({**snapshot, "model_args": asdict(params), "train_config": asdict(cfg),
                              "tokenizer": tokenizer_name}, last_path)

    curves_path = Path(args.output_dir) / "loss_curves.png"
    train_label = "training loss" + (f" (label smoothing {cfg.label_smoothing:g})" if cfg.label_smoothing else "")

    def on_validate(log):
        plot_lm_curves(curves_path, log["train_curve"], log["val_curve"], train_label=train_label,
                       title=f"llama.py: {model.num_params() / 1e6:.1f}M parameters, {device.type}, {precision.name}")

    writes = trainkit.is_main()  # rank 0 alone writes files
    log = train(model, streams, cfg, device, precision, on_best if writes else None, on_last if writes else None,
                resume=state, on_validate=on_validate if writes else None)
    trainkit.teardown_distributed()  # what follows (the test split, samples, the report) is rank 0's alone
    code = 1 if log["status"] == "nan" else trainkit.exit_code(log["signal"]) if log["signal"] else \
        130 if log["status"] == "interrupted" else 0
    if not writes:  # the outcome is rank 0's to report; exiting non-zero here would make torchrun stop rank 0
        return 0
    metrics = {"status": log["status"], "steps": log["steps"],
               "final_train_loss": sum(log["recent_losses"]) / max(len(log["recent_losses"]), 1)}
    if Path(args.checkpoint).is_file() and log["val_history"]:
        model, _ = load_checkpoint(args.checkpoint, device)  # the best validation checkpoint
        metrics.update(best_step=log["best_step"], val_loss=log["best_val_loss"],
                       val_perplexity=math.exp(log["best_val_loss"]))
        test_loss = evaluate(model, streams["test"], device, precision)
        metrics.update(test_loss=test_loss, test_perplexity=math.exp(test_loss))
        metrics["samples"] = [sample(model, tokenizer, p, device, args.sample_tokens, seed=args.seed)
                              for p in SAMPLE_PROMPTS]
    metrics.update(parameters=model.num_params(), tokens_seen=log["tokens_seen"],
                   tokens_per_s=log["tokens_seen"] / max(log["train_time_s"], 1e-9),
                   wall_time_s=log["wall_time_s"], data_time_s=data_time, device=str(device),
                   precision=precision.name, precision_reason=precision.reason, checkpoint=args.checkpoint)
    if curves_path.is_file():
        metrics["loss_curves"] = str(curves_path)
    report(metrics, Path(args.output_dir) / "metrics.json")
    if log["status"] == "nan":
        print("error: training diverged (loss is NaN or infinite); try a lower --lr", file=sys.stderr)
    elif log["signal"]:
        print(f"stopped by {signal.Signals(log['signal']).name} at step {log['steps']}; {last_path} holds the run: "
              f"add --resume to the same command to continue it", file=sys.stderr)
    return code


def read_resume_state(path: Path, params: ModelArgs, cfg: TrainConfig) -> dict:
    """The last checkpoint of a stopped run, checked against the model and training flags of this one."""
    if not path.is_file():
        raise UserError(f"--resume: no last checkpoint at {path}; it is written beside --checkpoint every "
                        "--eval-interval steps (start without --resume)")
    state = read_checkpoint(str(path))
    if not isinstance(state, dict) or "optimizer" not in state or "train_config" not in state:
        raise UserError(f"--resume: {path} is not a last checkpoint written by llama.py")
    try:
        trainkit.runs.resume_changes(state["model_args"], asdict(params))
        changes = trainkit.runs.resume_changes(state["train_config"], asdict(cfg),
                                          may_change=("max_steps", "time_budget", "eval_interval"))
    except ValueError as e:
        raise UserError(f"--resume {path}: {e}") from None
    for change in changes:
        print(f"resume: {change}")
    print(f"resuming from {path} at step {state['step']} ({state['log']['elapsed_s']:.0f}s trained so far)")
    return state


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        device = pick_device(args.device)
        if args.export_hf:
            return run_export_hf(args, device)
        if args.hf_model:
            if not args.eval_only:
                raise UserError("--hf-model evaluates a checkpoint: add --eval-only (training starts from scratch)")
            return run_eval_hf(args, device)
        if args.eval_only:
            return run_eval_only(args, device)
        try:
            device = trainkit.init_distributed(device)  # under torchrun: join the other processes
        except ValueError as e:
            raise UserError(str(e)) from None
        with trainkit.quiet_unless_main():
            return run_training(args, device)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    except KeyboardInterrupt:  # outside the training loop (which saves and reports on its own)
        print(f"interrupted; the best checkpoint saved so far, if any, is {args.checkpoint}", file=sys.stderr)
        raise SystemExit(130)
    finally:
        trainkit.teardown_distributed()


if __name__ == "__main__":
    sys.exit(main())
