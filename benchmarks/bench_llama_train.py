"""Training throughput of llama.py's Transformer vs Hugging Face's LlamaForCausalLM, same configuration.

Both models get the same batches; each measured step is forward, loss, backward and an AdamW step. The
two alternate (ours, theirs, ours, ...) so that drift in the machine's speed hits both alike; the median
over the repetitions is reported, in fp32 and with bf16 autocast. MFU is the achieved FLOP/s (6N + 12LdT
per token, PaLM appendix B) as a fraction of this machine's measured dense matmul peak for that dtype.

    python benchmarks/bench_llama_train.py [--repeats 8] [--batch-size 16] [--seq-len 128] [--compile]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import llama  # noqa: E402
from hf_reference import to_hf_llama  # noqa: E402


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """Dense n x n x n matmul FLOP/s: the ceiling the model's matmuls could reach here."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n ** 3 / best


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def make_steps(model, hf, x, y, bf16: bool):
    ours_opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    hf_opt = torch.optim.AdamW(hf.parameters(), lr=1e-4)

    def ours():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        llama.cross_entropy(logits, y).backward()  # the loss llama.py trains with
        ours_opt.step()
        ours_opt.zero_grad(set_to_none=True)

    def theirs():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = hf(input_ids=x, labels=x).loss
        loss.backward()
        hf_opt.step()
        hf_opt.zero_grad(set_to_none=True)

    return ours, theirs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=llama.PRESETS["default"]["batch_size"])
    p.add_argument("--seq-len", type=int, default=llama.PRESETS["default"]["max_seq_len"])
    p.add_argument("--compile", action="store_true", help="also time torch.compile(ours)")
    args = p.parse_args(argv)

    preset = llama.PRESETS["default"]
    torch.manual_seed(0)
    params = llama.ModelArgs(dim=preset["dim"], n_layers=preset["n_layers"], n_heads=preset["n_heads"],
                             n_kv_heads=preset["n_kv_heads"], max_seq_len=args.seq_len)  # dropout 0: HF has none
    model = llama.Transformer(params)
    hf = to_hf_llama(model).train()
    tokens = torch.randint(0, params.vocab_size, (args.batch_size, args.seq_len + 1))
    x, y = tokens[:, :-1], tokens[:, 1:]
    n_tokens = x.numel()
    flops = model.flops_per_token(args.seq_len) * n_tokens
    print(f"model: default preset, {model.num_params() / 1e6:.1f}M parameters; batch {args.batch_size} x "
          f"{args.seq_len} tokens; {torch.get_num_threads()} threads; median of {args.repeats} alternating steps")
    for dtype, bf16 in (("fp32", False), ("bf16", True)):
        peak = matmul_peak(torch.bfloat16 if bf16 else torch.float32)
        ours, theirs = make_steps(model, hf, x, y, bf16)
        runners = {"ours": ours, "HF": theirs}
        if args.compile:
            compiled = torch.compile(model)
            runners["ours+compile"] = make_steps(compiled, hf, x, y, bf16)[0]
        for fn in runners.values():  # warm-up (and compilation)
            fn(), fn()
        times = {name: [] for name in runners}
        for _ in range(args.repeats):
            for name, fn in runners.items():
                times[name].append(_timed(fn))
        hf_rate = n_tokens / statistics.median(times["HF"])
        print(f"\n{dtype}: matmul peak {peak / 1e9:.0f} GFLOP/s")
        for name, ts in times.items():
            rate = n_tokens / statistics.median(ts)
            mfu = flops / statistics.median(ts) / peak
            print(f"  {name:>13}: {rate:8.0f} tokens/s  {rate / hf_rate:5.2f}x HF  MFU {100 * mfu:4.1f}%")


if __name__ == "__main__":
    main()
