"""Training throughput of llama.py's Transformer vs Hugging Face's LlamaForCausalLM, same configuration.

Both models get the same batches; each measured step is forward, loss, backward and an AdamW step. The
two alternate (ours, theirs, ours, ...) so that drift in the machine's speed hits both alike; the median
over the repetitions is reported, in fp32 and with bf16 autocast. MFU is the achieved FLOP/s (6N + 12LdT
per token, PaLM appendix B) as a fraction of this machine's measured dense matmul peak for that dtype.

    python benchmarks/bench_llama_train.py [--repeats 8] [--batch-size 16] [--seq-len 128] [--compile] [--json PATH]
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
from machine import describe_machine, print_header, write_json  # noqa: E402


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
    p.add_argument("--json", metavar="PATH", help="also write the figures and the machine header to PATH")
    args = p.parse_args(argv)
    machine = describe_machine("cpu")
    print_header(machine)

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
    setup = {"model": "llama.py default preset", "parameters": model.num_params(), "batch_size": args.batch_size,
             "seq_len": args.seq_len, "repeats": args.repeats}
    print(f"model: default preset, {model.num_params() / 1e6:.1f}M parameters; batch {args.batch_size} x "
          f"{args.seq_len} tokens; median of {args.repeats} alternating steps")
    results = {"setup": setup}
    for dtype, bf16 in (("fp32", False), ("bf16", True)):
        peak = 1e9 * machine["bf16_autocast_matmul_gflops" if bf16 else "fp32_matmul_gflops"]
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
        print(f"\n{dtype}:")
        results[dtype] = {}
        for name, ts in times.items():
            rate = n_tokens / statistics.median(ts)
            mfu = flops / statistics.median(ts) / peak
            results[dtype][name] = {"tokens_per_s": rate, "ratio_to_hf": rate / hf_rate, "mfu": mfu}
            print(f"  {name:>13}: {rate:8.0f} tokens/s  {rate / hf_rate:5.2f}x HF  MFU {100 * mfu:4.1f}%")
    write_json(args.json, machine, results)


if __name__ == "__main__":
    main()
