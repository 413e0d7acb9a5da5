"""Real weights: Hugging Face Llama checkpoints into llama.py's Transformer, and ours out in their format.

    python llama.py --eval-only --hf-model HuggingFaceTB/SmolLM2-135M       # perplexity of a real checkpoint
    python llama_generation.py --hf-model HuggingFaceTB/SmolLM2-135M        # its text, from our Transformer
    python llama.py --export-hf llama_hf                                      # ours, for from_pretrained / pipeline

transformers reads and writes the files (safetensors, shards, downloads); this module only converts names and
layouts, checks shapes, and reads the config into llama.ModelArgs.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional

import torch

import llama
from trainkit import UserError, choose_precision

# ----------------------------------------------------------------------------------------------------
# Names and layouts
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


def from_hf_state_dict(hf_state: dict[str, torch.Tensor], args: llama.ModelArgs) -> dict[str, torch.Tensor]:
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


def expected_shape(name: str, args: llama.ModelArgs) -> tuple[int, ...]:
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


def to_hf_state_dict(state: dict[str, torch.Tensor], args: llama.ModelArgs) -> dict[str, torch.Tensor]:
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


def model_args_from_hf_config(config, max_seq_len: Optional[int] = None) -> llama.ModelArgs:
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
    return llama.ModelArgs(dim=config.hidden_size, n_layers=config.num_hidden_layers,
                           n_heads=config.num_attention_heads, n_kv_heads=config.num_key_value_heads,
                           vocab_size=config.vocab_size, ffn_hidden_dim=config.intermediate_size,
                           norm_eps=config.rms_norm_eps, rope_theta=float(rope.get("rope_theta", 10000.0)),
                           max_seq_len=positions, dropout=0.0, tie_embeddings=bool(config.tie_word_embeddings),
                           rope_scaling=scaling)


def hf_config_from_model_args(args: llama.ModelArgs, tokenizer=None):
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


def inference_dtype(device: torch.device, checkpoint_dtype: torch.dtype,
                    args: llama.ModelArgs) -> tuple[torch.dtype, str]:
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
                  dtype: Optional[torch.dtype] = None) -> tuple[llama.Transformer, str]:
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


def model_from_weights(args: llama.ModelArgs, state: dict[str, torch.Tensor]) -> llama.Transformer:
    """A Transformer that takes these tensors as its parameters, without first allocating and randomly
    initialising its own (for a 1B model that would cost 5 GB and seconds): it is built on the "meta" device
    (shapes only), then load_state_dict(assign=True) puts the tensors in place."""
    with torch.device("meta"):
        model = llama.Transformer(args)
    model.load_state_dict(state, assign=True)
    if args.tie_embeddings:  # assign gave the two names two Parameter objects: make them one again
        model.output.weight = model.tok_embeddings.weight
    # The rotary table is no parameter (and complex): compute it for real, in float32 whatever the weights' dtype.
    model.freqs_cis = llama.precompute_freqs_cis(args.head_dim, args.max_seq_len, args.rope_theta, args.rope_scaling)
    return model


def export_hf(model: llama.Transformer, tokenizer, out_dir: str) -> list[str]:
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
# Llama 3.1's long-context rotary frequencies (llama.precompute_freqs_cis applies them when the config has them)

LLAMA3_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def check_rope_scaling(scaling: dict) -> None:
    """Only Llama 3.1's scaling is implemented; any other kind would silently give wrong positions."""
    kind = scaling.get("rope_type")
    if kind != "llama3":
        raise UserError(f"rope scaling of type '{kind}' is not implemented; only 'llama3' (Llama 3.1 and 3.2) is")
    missing = [k for k in LLAMA3_SCALING_KEYS if k not in scaling]
    if missing:
        raise UserError(f"llama3 rope scaling needs {', '.join(missing)}")


def llama3_scaled_frequencies(freqs: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1's long-context RoPE: slow frequencies divided by `factor`, fast ones kept, a blend between.

    A frequency whose wavelength 2*pi/f is longer than original/low_freq_factor never completed a turn in
    training, so it is stretched (f / factor) to cover a longer context; one shorter than
    original/high_freq_factor encodes local order and is kept. In between, s = (original/wavelength - low) /
    (high - low) goes from 0 to 1 and the frequency is (1 - s) * f / factor + s * f.
    """
    check_rope_scaling(scaling)
    factor, low, high, original = (scaling[k] for k in LLAMA3_SCALING_KEYS)
    wavelength = 2 * math.pi / freqs
    smooth = (original / wavelength - low) / (high - low)
    blended = (1 - smooth) * freqs / factor + smooth * freqs
    scaled = torch.where(wavelength > original / low, freqs / factor, blended)
    return torch.where(wavelength < original / high, freqs, scaled)


# ----------------------------------------------------------------------------------------------------
# Tokenizers


def bos_ids(tokenizer) -> list[int]:
    """The tokens the tokenizer puts before any text on its own (Llama's BOS; nothing for GPT-2's)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    starts = [i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain]
    return full[:starts[0]] if starts else []


def end_of_turn_id(tokenizer) -> int | None:
    """The token that ends an assistant's turn in the tokenizer's chat template (ChatML's <|im_end|>, Llama 3's
    <|eot_id|>): the special token the template writes right after a message; else the end-of-text token."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": "?"}, {"role": "assistant", "content": "!"}],
                                         tokenize=False)
    after = tokenizer(text[text.rindex("!") + 1:], add_special_tokens=False)["input_ids"]
    return after[0] if after and after[0] in tokenizer.all_special_ids else tokenizer.eos_token_id
