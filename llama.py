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

The last three are sub-commands of the tool around the lesson (extras/llama_commands.py, extras/llama_hf.py),
which also writes a training run's checkpoints, loss curves and metrics.json.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import trainkit
from trainkit import PRECISIONS, Precision, UserError
from trainkit.losses import ChunkedCrossEntropy

CHECKPOINT = "llama_wikitext_trained.pth"
TRAIN_FIRST = "train one first with `python llama.py` (offline: add --data-dir DIR --tokenizer DIR)"


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
    rope_scaling: Optional[dict] = None  # Llama 3.1's long-context RoPE {"rope_type": "llama3", ...} (real checkpoints)

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
    if scaling is not None:  # Llama 3.1 and 3.2's long-context frequencies, set by real checkpoints only
        from extras.llama_hf import llama3_scaled_frequencies

        freqs = llama3_scaled_frequencies(freqs, scaling)
    angles = torch.outer(torch.arange(end, dtype=torch.float32), freqs)
    return torch.polar(torch.ones_like(angles), angles)


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


class KVCache:
    """Keys and values of every layer for the positions decoded so far, so each new token costs one position.

    k[layer] and v[layer] have shape (batch, n_kv_heads, max_seq_len, head_dim); positions < start_pos are filled.
    """

    def __init__(self, args: ModelArgs, batch_size: int, device=None, dtype=torch.float32):
        shape = (batch_size, args.n_kv_heads, args.max_seq_len, args.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)]
        self.pad = None  # (batch, max_seq_len) bool, True at the left padding of shorter prompts

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
                                                                params.rope_scaling), persistent=False)
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
        for layer in self.layers:
            h = layer(h, start_pos, freqs_cis, mask, cache)
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


def tokenizer_for(model: Transformer, name_or_path: str):
    """load_tokenizer, checked against the model: a token id beyond its vocabulary has no embedding."""
    tokenizer = load_tokenizer(name_or_path)
    if len(tokenizer) > model.params.vocab_size:
        raise UserError(f"the tokenizer has {len(tokenizer)} tokens but the model was trained with "
                        f"{model.params.vocab_size}; pass the --tokenizer it was trained with")
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
    targets smoothed towards the uniform distribution (Szegedy et al. 2016). Computed a few rows at a time
    (trainkit.losses): the float32 copy of (batch * seq, 50k) logits would be the step's largest tensor."""
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


def build_model(model_args: dict, state_dict: dict, source: str = "the checkpoint") -> Transformer:
    """A Transformer of the given ModelArgs holding the given weights."""
    known = {f.name for f in fields(ModelArgs)}
    model = Transformer(ModelArgs(**{k: v for k, v in model_args.items() if k in known}))
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        raise UserError(f"{source}: the weights do not fit the model's arguments ({str(e).splitlines()[1].strip()[:160]})") from None
    return model


def train_step(trainer: trainkit.TrainStep, batches, cfg: TrainConfig, lr: float, device) -> tuple[float, int]:
    """One optimizer step over grad_accum micro-batches: forward, loss, backward, then clip and step (not taken
    when the loss is not finite). Returns the loss, the mean over the micro-batches and the processes, and the
    number of tokens this process trained on."""
    loss_sum, tokens = 0.0, 0
    for micro in range(cfg.grad_accum):
        inputs, targets = (t.to(device) for t in trainkit.local_share(*next(batches)))  # this process's rows
        with trainer.forward_context(sync=micro == cfg.grad_accum - 1):  # autocast; DDP syncs on the last
            logits = trainer.model(inputs)
        loss = cross_entropy(logits, targets, cfg.label_smoothing)
        trainer.backward(loss / cfg.grad_accum)  # the gradients add up over the micro-batches
        loss_sum, tokens = loss_sum + loss.item() / cfg.grad_accum, tokens + inputs.numel()
    (loss_sum,) = trainkit.all_reduce([loss_sum / trainkit.world_size()])  # the same on all: a NaN stops all
    if math.isfinite(loss_sum):
        trainer.update(lr)  # the learning rate set, the gradients' norm clipped to grad_clip, a step, zero_grad
    return loss_sum, tokens


def log_step(log: dict, loss: float, tokens: int, seconds: float, budget: trainkit.Budget) -> None:
    """Add one optimizer step to the log: its loss, the tokens all processes trained on, the time it took."""
    log["train_time_s"] += seconds
    log["elapsed_s"], log["signal"] = budget.elapsed_s, budget.signum
    log["tokens_seen"] += tokens * trainkit.world_size()
    log["recent_losses"] = (log["recent_losses"] + [loss])[-50:]  # the report's final training loss
    log["train_curve"].append((log["tokens_seen"], loss))


def progress_bar():
    """Rank 0's progress bar, in percent of the run: of max_steps or of the time budget, whichever ends it first."""
    from tqdm.auto import tqdm

    return tqdm(total=100, unit="%", disable=not trainkit.is_main(),
                bar_format="{l_bar}{bar}| {elapsed}<{remaining} {postfix}")


def train(model: Transformer, streams: dict, cfg: TrainConfig, device: torch.device, precision: Precision,
          on_best=None, on_last=None, resume: Optional[dict] = None, on_validate=None) -> dict:
    """Train until max_steps or the time budget, validating every eval_interval steps.

    on_best(model, val_loss) is called when the validation loss improves, on_validate(log) after every
    validation, on_last(state) every eval_interval steps and at the end with all a resumed run needs; `resume`
    is such a state. Under torchrun every process runs this on its share of each batch and all agree on when
    to stop. Returns the log: status ("completed", "interrupted" or "nan"), losses, counts, times and curves.
    """
    generator = torch.Generator().manual_seed(cfg.seed)
    batches = train_batches(streams["train"], model.params.max_seq_len, cfg.batch_size, generator,
                            skip=resume["batches_drawn"] if resume else 0)
    # autocast, fp16 loss scaling, gradient clipping and, under torchrun, DDP around the optimizer step
    trainer = trainkit.TrainStep(model, configure_optimizer(model, cfg), precision, device, cfg.grad_clip)
    log = {"status": "completed", "steps": 0, "tokens_seen": 0, "train_time_s": 0.0, "elapsed_s": 0.0,
           "best_val_loss": math.inf, "best_step": 0, "recent_losses": [], "val_history": [], "signal": 0,
           "train_curve": [], "val_curve": []}
    step = resume["step"] if resume else 0
    if resume:  # the weights, the optimizer's moments, the log and the random generators where the run stopped
        trainer.load_state_dict(resume)
        log.update(resume["log"], status="completed", signal=0)
        trainkit.set_rng_state(resume["rng"])
    model.train()
    start, bar = time.perf_counter(), progress_bar()

    def validate():
        val = evaluate(model, streams["validation"], device, precision)  # the same figure on every process
        log["val_history"].append((step, val))
        log["val_curve"].append((log["tokens_seen"], val))
        bar.write(f"step {step}: validation loss {val:.3f}, perplexity {math.exp(val):.1f}")
        if val < log["best_val_loss"]:
            log["best_val_loss"], log["best_step"] = val, step
            if on_best is not None:
                on_best(model, val)
        if on_validate is not None:
            on_validate(log)
        model.train()

    def snapshot():
        return {**trainer.state_dict(), "step": step, "batches_drawn": step * cfg.grad_accum, "log": dict(log),
                "rng": trainkit.rng_state()}

    # max_steps, the time budget and SIGINT/SIGTERM (which only raise a flag inside), agreed by all processes
    budget = trainkit.Budget(cfg.max_steps, cfg.time_budget, log["elapsed_s"])
    try:
        with budget:
            while not budget.done(step):
                lr = learning_rate(step, budget.progress(step), cfg)
                t0 = time.perf_counter()
                loss, tokens = train_step(trainer, batches, cfg, lr, device)
                budget.agree()
                if not math.isfinite(loss):
                    log["status"] = "nan"
                    bar.write(f"step {step}: the loss is {loss}; stopping (the last good checkpoint is kept)")
                    break
                step += 1
                log_step(log, loss, tokens, time.perf_counter() - t0, budget)
                bar.n = round(100 * budget.progress(step), 1)
                bar.set_postfix_str(f"step {step} loss {loss:.3f} lr {lr:.2e} "
                                    f"{log['tokens_seen'] / log['train_time_s']:.0f} tok/s")
                if step % cfg.eval_interval == 0:
                    validate()
                    if on_last is not None:
                        on_last(snapshot())
    except KeyboardInterrupt:  # a second Ctrl-C, in the middle of a step: no resumable state
        log["status"] = "interrupted"
        bar.write("interrupted: evaluating and saving what was trained so far")
    finally:
        bar.close()
    log["steps"] = step
    if log["signal"]:  # SIGTERM or Ctrl-C: save where it stopped; validation waits for the resumed run
        log["status"] = "interrupted"
    elif step > 0 and log["status"] != "nan" and (not log["val_history"] or log["val_history"][-1][0] != step):
        validate()
    if on_last is not None and log["status"] != "nan" and (log["signal"] or log["status"] == "completed"):
        on_last(snapshot())
    log["wall_time_s"] = time.perf_counter() - start
    return log


# ----------------------------------------------------------------------------------------------------
# Command line

# Each preset fills the flags that are not given. "default" is sized for a 2-core laptop CPU: validation
# perplexity on WikiText-2 bottoms out after a few epochs, so 1000 steps with the cosine decay finished by
# then, the 15 minutes a cap for slower machines. Label smoothing keeps some probability on unseen tokens.
PRESETS = {
    "smoke": dict(dim=32, n_layers=1, n_heads=2, n_kv_heads=None, max_seq_len=32, dropout=0.0,
                  batch_size=4, grad_accum=1, lr=3e-3, warmup_steps=1, weight_decay=0.1, label_smoothing=0.0,
                  max_steps=4, time_budget=None, eval_interval=2, sample_tokens=8),
    "default": dict(dim=256, n_layers=4, n_heads=8, n_kv_heads=None, max_seq_len=128, dropout=0.2,
                    batch_size=8, grad_accum=1, lr=2e-3, warmup_steps=100, weight_decay=0.1,
                    label_smoothing=0.1, max_steps=1000, time_budget=15.0, eval_interval=100, sample_tokens=40),
    "gpu": dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=None, max_seq_len=512, dropout=0.1,
                batch_size=32, grad_accum=1, lr=1e-3, warmup_steps=200, weight_decay=0.1,
                label_smoothing=0.0, max_steps=None, time_budget=30.0, eval_interval=250, sample_tokens=60),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = trainkit.OneLineParser(description="Train a small LLaMA on WikiText-2 and report its perplexity.",
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=PRESETS, default="default", help="sizes; any flag below overrides its value")
    d = p.add_argument_group("data")
    d.add_argument("--data-dir", help="local folder with wiki.{train,valid,test}.raw instead of the Hub")
    d.add_argument("--dataset", default="Salesforce/wikitext", help="Hub dataset (used without --data-dir)")
    d.add_argument("--dataset-config", default="wikitext-2-raw-v1")
    d.add_argument("--tokenizer", default=None, help="Hub name or local folder (default: gpt2, or the checkpoint's)")
    m = p.add_argument_group("model (default: the preset's)")
    for flag in ("--dim", "--n-layers", "--n-heads"):
        m.add_argument(flag, type=int)
    m.add_argument("--n-kv-heads", type=int, help="fewer than --n-heads for grouped-query attention")
    m.add_argument("--max-seq-len", type=int, help="context length (--hf-model: the evaluation window, up to 1024)")
    m.add_argument("--dropout", type=float)
    t = p.add_argument_group("training (default: the preset's)")
    t.add_argument("--batch-size", type=int, help="windows per micro-batch, shared by torchrun's processes")
    t.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step")
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
                   help="autocast precision; auto: by the GPU's compute capability, on a CPU the faster measured")
    o = p.add_argument_group("output")
    o.add_argument("--checkpoint", default=CHECKPOINT, help="where the trained model is saved (or read)")
    o.add_argument("--output-dir", default="runs/llama", help="where metrics.json and loss_curves.png are written")
    o.add_argument("--eval-only", action="store_true", help="evaluate --checkpoint on --split, no training")
    o.add_argument("--resume", action="store_true", help="continue the run saved beside --checkpoint "
                   "(NAME.last.pth); only --max-steps, --time-budget, --eval-interval may change")
    o.add_argument("--split", choices=list(WIKITEXT_FILES), default="test", help="split for --eval-only")
    r = p.add_argument_group("real weights (Hugging Face Llama checkpoints)")
    r.add_argument("--hf-model", metavar="NAME_OR_DIR", help="with --eval-only: a LlamaForCausalLM's perplexity")
    r.add_argument("--export-hf", metavar="DIR", help="write --checkpoint as a Hugging Face Llama to DIR")
    args = p.parse_args(argv)
    args.hf_max_seq_len = args.max_seq_len  # before the preset fills it: --hf-model's window only if given
    return trainkit.fill_preset(args, PRESETS[args.preset])


def run_training(args, device) -> int:
    """The tokenizer, the data, the model and its precision from the flags; train; report."""
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
    except ValueError as e:  # a batch the processes cannot share evenly
        raise UserError(str(e)) from None
    # auto times a batch of tokens through the feed-forward's first layer. Measured on rank 0 and used by all:
    # every process must compute in the same precision.
    tokens = min(local_batch * params.max_seq_len, 2048)
    precision = trainkit.same_on_all(trainkit.precision.for_model(args.precision, device, tokens, params.dim,
                                                                  params.hidden_dim))
    print(f"device {device}, {precision.name}; {model.num_params() / 1e6:.1f}M parameters; "
          f"tokens: " + ", ".join(f"{k} {len(v)}" for k, v in streams.items()) + f" (loaded in {data_time:.1f}s)")
    print(f"batch: {cfg.batch_size * cfg.grad_accum} windows per step (batch {cfg.batch_size} x grad-accum "
          f"{cfg.grad_accum}), {trainkit.world_size()} process(es) x {local_batch} windows per micro-batch")
    from extras import llama_commands  # --resume, the checkpoints, the loss curves and the report

    resume, callbacks = llama_commands.training_files(args, model, cfg, device, precision, tokenizer_name)
    log = train(model, streams, cfg, device, precision, resume=resume, **callbacks)
    return llama_commands.finish_training(args, model, log, streams, tokenizer, device, precision, data_time)


def main(argv=None) -> int:
    args = parse_args(argv)
    with trainkit.one_line_errors("llama.py", f"interrupted; the best checkpoint saved so far, if any, is "
                                              f"{args.checkpoint}"):
        try:
            device = trainkit.pick_device(args.device)
            if args.eval_only or args.hf_model or args.export_hf:
                from extras import llama_commands  # evaluation, real weights in and out: the tool's sub-commands

                return llama_commands.run(args, device)
            try:
                device = trainkit.init_distributed(device)  # under torchrun: join the other processes
            except ValueError as e:
                raise UserError(str(e)) from None
            with trainkit.quiet_unless_main():
                return run_training(args, device)
        finally:
            trainkit.teardown_distributed()


if __name__ == "__main__":
    import llama  # one module object, whether run as a script or imported by the tool (extras/, tests)

    sys.exit(llama.main())
