"""The sub-commands of llama.py and llama_generation.py around the lesson: evaluation, real weights in and out,
checkpoints that are a bare state_dict; and what a training run reads and writes around llama.train() (--resume,
the checkpoints, the loss curves, the report that ends it).

    python llama.py --eval-only --checkpoint llama_wikitext_trained.pth --split test
    python llama.py --eval-only --hf-model HuggingFaceTB/SmolLM2-135M
    python llama.py --export-hf llama_hf
    python llama_generation.py --hf-model HuggingFaceTB/SmolLM2-135M
    python llama_generation.py --checkpoint bare_state_dict.pth --n-heads 8

Lesson functions are called through the module (llama.evaluate, ...), so a test that replaces one sees it used.
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

import llama
import trainkit
from trainkit import UserError

SAMPLE_PROMPTS = ["In a world where", "The history of the city", "She was born in"]
HF_DEFAULT_CONTEXT = 4096  # a Llama 3.2 allows 131,072 positions: 4 GiB of KV cache for the 1B model in bf16


def run(args, device) -> int:
    """llama.py --eval-only, --hf-model or --export-hf."""
    if args.export_hf:
        return run_export_hf(args)
    if args.hf_model:
        if not args.eval_only:
            raise UserError("--hf-model evaluates a checkpoint: add --eval-only (training starts from scratch)")
        return run_eval_hf(args, device)
    return run_eval_only(args, device)


def report_eval(args, metrics: dict) -> int:
    path = trainkit.write_metrics(metrics, Path(args.output_dir) / f"eval_{args.split}.json")
    trainkit.print_metrics(metrics, path)
    return 0


def save_checkpoint(path: str, model: llama.Transformer, tokenizer_name: str, **extra) -> None:
    """state_dict + ModelArgs + tokenizer, written to a temporary file and renamed: never half a file."""
    ckpt = {"model": model.state_dict(), "model_args": asdict(model.params), "tokenizer": tokenizer_name, **extra}
    trainkit.atomic_save(ckpt, path)


def load_checkpoint(path: str, device="cpu") -> tuple[llama.Transformer, dict]:
    """Rebuild the model from the ModelArgs stored beside its weights."""
    ckpt = trainkit.read_checkpoint(path, llama.TRAIN_FIRST)
    if "model" not in ckpt or "model_args" not in ckpt:
        raise UserError(f"{path} holds no 'model' and 'model_args'; was it saved by llama.py?")
    return llama.build_model(ckpt["model_args"], ckpt["model"], path).to(device), ckpt


def run_eval_only(args, device) -> int:
    """The perplexity of a checkpoint saved by llama.py on one split."""
    model, ckpt = load_checkpoint(args.checkpoint, device)
    tokens = min(16 * model.params.max_seq_len, 2048)  # evaluate's batches of 16 windows
    precision = trainkit.precision.for_model(args.precision, device, tokens, model.params.dim, model.params.hidden_dim)
    tokenizer = llama.tokenizer_for(model, args.tokenizer or ckpt.get("tokenizer") or "gpt2")
    raw = llama.load_wikitext(args.data_dir, args.dataset, args.dataset_config)
    tokens = llama.tokenize_splits(raw, tokenizer)[args.split]
    loss = llama.evaluate(model, tokens, device, precision)
    return report_eval(args, {"checkpoint": args.checkpoint, "split": args.split, "tokens": len(tokens) - 1,
                              f"{args.split}_loss": loss, f"{args.split}_perplexity": math.exp(loss)})


def run_eval_hf(args, device) -> int:
    """Perplexity of a real checkpoint on WikiText. Its tokenizer's special tokens (a BOS on every line, for
    Llama 3) are left out of the stream; the BOS it puts before a text starts the stream, once."""
    from extras import llama_hf

    cap = args.hf_max_seq_len if args.hf_max_seq_len is not None else 1024
    model, why = llama_hf.load_hf_model(args.hf_model, device, cap)
    print(f"{args.hf_model}: {model.num_params() / 1e6:.1f}M parameters, {model.output.weight.dtype} ({why}), "
          f"windows of {model.params.max_seq_len} tokens")
    tokenizer = llama.load_tokenizer(args.hf_model)
    raw = llama.load_wikitext(args.data_dir, args.dataset, args.dataset_config)
    tokens = llama.tokenize_splits(raw, tokenizer, add_special_tokens=False)[args.split]
    tokens = torch.cat([torch.tensor(llama_hf.bos_ids(tokenizer), dtype=tokens.dtype), tokens])
    batch_size = max(1, 2048 // model.params.max_seq_len)  # about 2,048 tokens of logits at a time
    loss = llama.evaluate(model, tokens, device, None, batch_size)
    return report_eval(args, {"hf_model": args.hf_model, "split": args.split, "tokens": len(tokens) - 1,
                              "window": model.params.max_seq_len,
                              "dtype": str(model.output.weight.dtype).removeprefix("torch."),
                              f"{args.split}_loss": loss, f"{args.split}_perplexity": math.exp(loss)})


def run_export_hf(args) -> int:
    from extras import llama_hf

    model, ckpt = load_checkpoint(args.checkpoint, "cpu")
    tokenizer = llama.tokenizer_for(model, args.tokenizer or ckpt.get("tokenizer") or "gpt2")
    written = llama_hf.export_hf(model, tokenizer, args.export_hf)
    print(f"wrote {', '.join(written)} to {args.export_hf}; load it with "
          f"LlamaForCausalLM.from_pretrained({args.export_hf!r}) or pipeline('text-generation', model=...)")
    return 0


# ----------------------------------------------------------------------------------------------------
# Around llama.train(): --resume, the checkpoints and loss curves it writes, the report at its end


def training_files(args, model: llama.Transformer, cfg: llama.TrainConfig, device: torch.device,
                   precision: trainkit.Precision, tokenizer_name: str) -> tuple[Optional[dict], dict]:
    """The state to resume from (--resume; else None) and the keyword arguments of llama.train() that write the
    files of the run: the best checkpoint (--checkpoint), the last state beside it (NAME.last.pth, for --resume)
    and the loss curves (--output-dir). Under torchrun rank 0 alone writes: the others get no callbacks."""
    params, last_path = model.params, trainkit.last_checkpoint_path(args.checkpoint)
    state = None
    if args.resume:
        state = trainkit.read_resume_state(last_path, "llama.py", asdict(params), asdict(cfg),
                                           may_change=("max_steps", "time_budget", "eval_interval"))
        print(f"resuming from {last_path} at step {state['step']} ({state['log']['elapsed_s']:.0f}s trained so far)")
    if not trainkit.is_main():
        return state, {}
    curves_path = Path(args.output_dir) / "loss_curves.png"
    train_label = "training loss" + (f" (label smoothing {cfg.label_smoothing:g})" if cfg.label_smoothing else "")
    title = f"llama.py: {model.num_params() / 1e6:.1f}M parameters, {device.type}, {precision.name}"

    def on_best(m, val_loss):
        save_checkpoint(args.checkpoint, m, tokenizer_name, val_loss=val_loss)

    def on_last(snapshot):  # what --resume needs, with the config and flags it must find again
        trainkit.atomic_save({**snapshot, "config": asdict(params), "flags": asdict(cfg), "tokenizer": tokenizer_name},
                             last_path)

    def on_validate(log):
        trainkit.pictures.plot_lm_curves(curves_path, log["train_curve"], log["val_curve"], train_label=train_label,
                                         title=title)

    return state, dict(on_best=on_best, on_last=on_last, on_validate=on_validate)


def finish_training(args, model: llama.Transformer, log: dict, streams: dict, tokenizer, device: torch.device,
                    precision: trainkit.Precision, data_time: float) -> int:
    """After llama.train(): rank 0 reports (the test split, samples, metrics.json) and says how the run ended.
    Returns the exit code: 0, 1 when the loss diverged, 128 + the signal's number when one stopped the run."""
    writes = trainkit.is_main()
    trainkit.teardown_distributed()  # what follows (the test split, samples, the report) is rank 0's alone
    if not writes:  # the outcome is rank 0's to report; exiting non-zero here would make torchrun stop rank 0
        return 0
    report(args, model, log, streams, tokenizer, device, precision, data_time)
    if log["status"] == "nan":
        print("llama.py: error: training diverged (loss is NaN or infinite); try a lower --lr", file=sys.stderr)
        return 1
    if log["signal"]:
        last_path = trainkit.last_checkpoint_path(args.checkpoint)
        print(trainkit.stopped_note(log["signal"], f"at step {log['steps']}", last_path), file=sys.stderr)
        return trainkit.exit_code(log["signal"])
    return 130 if log["status"] == "interrupted" else 0


@torch.no_grad()
def sample(model: llama.Transformer, tokenizer, prompt: str, device: torch.device, max_new_tokens: int = 40,
           temperature: float = 0.8, top_k: int = 40, seed: int = 0) -> str:
    """A quick look at what the model writes: top-k sampling with the KV cache, written out here so that it
    needs none of llama_generation.py's exercises (which teaches the strategies)."""
    model.eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    ids = tokenizer(prompt)["input_ids"][-model.params.max_seq_len // 2:]
    cache = llama.KVCache(model.params, 1, device, model.output.weight.dtype)
    logits = model(torch.tensor([ids], device=device), 0, cache)[:, -1]
    out = []
    for pos in range(len(ids), min(len(ids) + max_new_tokens, model.params.max_seq_len)):
        logits = logits / temperature
        logits[logits < torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]] = -float("inf")
        nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
        out.append(nxt.item())
        logits = model(nxt, pos, cache)[:, -1]
    return prompt + tokenizer.decode(out)


def report(args, model, log: dict, streams: dict, tokenizer, device, precision, data_time: float) -> None:
    """metrics.json and its figures on stdout: the best checkpoint's validation and test losses, and samples."""
    metrics = {"status": log["status"], "steps": log["steps"],
               "final_train_loss": sum(log["recent_losses"]) / max(len(log["recent_losses"]), 1)}
    if Path(args.checkpoint).is_file() and log["val_history"]:
        model, _ = load_checkpoint(args.checkpoint, device)  # the best validation checkpoint
        metrics.update(best_step=log["best_step"], val_loss=log["best_val_loss"],
                       val_perplexity=math.exp(log["best_val_loss"]))
        test_loss = llama.evaluate(model, streams["test"], device, precision)
        metrics.update(test_loss=test_loss, test_perplexity=math.exp(test_loss))
        metrics["samples"] = [sample(model, tokenizer, p, device, args.sample_tokens, seed=args.seed)
                              for p in SAMPLE_PROMPTS]
    metrics.update(parameters=model.num_params(), tokens_seen=log["tokens_seen"],
                   tokens_per_s=log["tokens_seen"] / max(log["train_time_s"], 1e-9),
                   wall_time_s=log["wall_time_s"], data_time_s=data_time, device=str(device),
                   precision=precision.name, precision_reason=precision.reason, checkpoint=args.checkpoint)
    curves_path = Path(args.output_dir) / "loss_curves.png"
    if curves_path.is_file():
        metrics["loss_curves"] = str(curves_path)
    path = trainkit.write_metrics(metrics, Path(args.output_dir) / "metrics.json")
    trainkit.print_metrics(metrics)
    for text in metrics.get("samples", []):
        print(f"\n--- sample ---\n{text}")
    print(f"\nmetrics written to {path}")


# ----------------------------------------------------------------------------------------------------
# llama_generation.py's other sources of a model


def load_hf_for_generation(args, device):
    """--hf-model: the checkpoint in our Transformer, in its own dtype where the device is fast in it (see
    llama_hf.inference_dtype), and its tokenizer."""
    from extras import llama_hf

    model, why = llama_hf.load_hf_model(args.hf_model, device, args.max_seq_len or HF_DEFAULT_CONTEXT)
    tokenizer = llama.tokenizer_for(model, args.tokenizer or args.hf_model)
    print(f"{args.hf_model}: {model.num_params() / 1e6:.1f}M parameters, "
          f"{str(model.output.weight.dtype).removeprefix('torch.')} ({why}), context {model.params.max_seq_len}",
          file=sys.stderr)
    return model, tokenizer


def load_bare_state_dict(state: dict, path: str, args) -> llama.Transformer:
    """A checkpoint that is a bare state_dict, without its ModelArgs: dim, n_layers and vocab_size are read off
    the weights' shapes, the rest comes from the flags --n-heads, --n-kv-heads, --max-seq-len, --multiple-of."""
    if "tok_embeddings.weight" not in state:
        raise UserError(f"{path} is neither a llama.py checkpoint nor a LLaMA state_dict")
    if args.n_heads is None:
        raise UserError(f"{path} is a bare state_dict without its ModelArgs; give --n-heads (and --n-kv-heads, "
                        "--max-seq-len, --multiple-of if they differ from the defaults) it was trained with")
    vocab_size, dim = state["tok_embeddings.weight"].shape
    n_layers = len({k.split(".")[1] for k in state if k.startswith("layers.")})
    tied = "output.weight" not in state or torch.equal(state["output.weight"], state["tok_embeddings.weight"])
    model_args = dict(dim=dim, n_layers=n_layers, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
                      vocab_size=vocab_size, tie_embeddings=tied)
    model_args.update({k: v for k, v in dict(max_seq_len=args.max_seq_len, multiple_of=args.multiple_of).items()
                       if v is not None})
    return llama.build_model(model_args, state, path)
