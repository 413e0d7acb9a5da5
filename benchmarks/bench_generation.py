"""Greedy decoding speed: our KV cache vs recomputing the prefix vs Hugging Face's generate.

All of them run the same random weights of llama.py's default model (max_seq_len raised so 256 new tokens
fit), batch 1, in one process, alternating, and the median of several repetitions is reported, for each
dtype asked for (the weights of both models in that dtype).

    python benchmarks/bench_generation.py [--new-tokens 256] [--repeats 5] [--dtype fp32 bf16] [--json PATH]
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
import llama_generation as gen  # noqa: E402
import trainkit  # noqa: E402
from hf_reference import to_hf_llama  # noqa: E402
from machine import describe_machine, print_header, write_json  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def measure(args, dtype: str) -> dict:
    preset = llama.PRESETS["default"]
    torch.manual_seed(0)
    model = llama.Transformer(llama.ModelArgs(dim=preset["dim"], n_layers=preset["n_layers"],
                                              n_heads=preset["n_heads"], n_kv_heads=preset["n_kv_heads"],
                                              max_seq_len=args.prompt_tokens + args.new_tokens)).eval()
    hf = to_hf_llama(model)
    # bf16 halves the bytes read per token; the output matrix alone is 51 MB in fp32
    model, hf = model.to(DTYPES[dtype]), hf.to(DTYPES[dtype])
    prompt = torch.randint(0, model.params.vocab_size, (1, args.prompt_tokens))

    def hf_generate():
        return hf.generate(prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                           eos_token_id=None, pad_token_id=0)[:, prompt.shape[1]:]

    def hf_generate_onednn_off():
        with trainkit.kernels.onednn(False):
            return hf_generate()

    runners = {
        "ours, KV cache": lambda: gen.generate_tokens(model, prompt, args.new_tokens, gen.pick_greedy)[0],
        "ours, recompute prefix": lambda: gen.generate_tokens(model, prompt, args.new_tokens, gen.pick_greedy,
                                                              use_cache=False)[0],
        "HF generate, cache": hf_generate,
        # Not a baseline: Hugging Face's model on PyTorch's own matrix-vector kernels (oneDNN off), one of the
        # decoding kernels measured below, to show what that choice alone is worth.
        "HF generate, oneDNN off": hf_generate_onednn_off,
    }
    outputs = {name: run() for name, run in runners.items()}  # warm-up, and the same tokens from all of them
    same = all(torch.equal(o, outputs["HF generate, cache"]) for o in outputs.values())
    times = {name: [] for name in runners}
    with torch.inference_mode():
        for _ in range(args.repeats):
            for name, run in runners.items():
                t0 = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - t0)

    print(f"\n{dtype}: {model.num_params() / 1e6:.1f}M parameters (default preset), batch 1, "
          f"{args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, median of {args.repeats}; "
          f"identical tokens: {same}")
    hf_rate = args.new_tokens / statistics.median(times["HF generate, cache"])
    rates = {}
    for name, ts in times.items():
        rate = args.new_tokens / statistics.median(ts)
        rates[name] = {"tokens_per_s": rate, "ratio_to_hf": rate / hf_rate}
        print(f"{name:>24}: {rate:7.1f} tokens/s   {rate / hf_rate:5.2f}x HF")
    # The decoding kernels measured fastest here for one row (trainkit.kernels), for a decoder that uses them.
    attention, ffn = model.layers[0].attention, model.layers[0].feed_forward
    layer = [m.weight for m in (attention.wq, attention.wk, attention.wv, attention.wo, ffn.w1, ffn.w2, ffn.w3)]
    kernels = trainkit.kernels.fastest_row_kernels(layer, len(model.layers), model.output.weight, 1)
    print(kernels.describe())
    return {"identical_tokens": same, "decoding": rates,
            "kernels": {"onednn": kernels.onednn, "transposed_output": kernels.transposed_output,
                        "ms_per_step": {kernels.name(k): ms for k, ms in kernels.ms_per_step.items()}}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--prompt-tokens", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=list(DTYPES), help="both models' weights")
    p.add_argument("--json", metavar="PATH", help="also write the figures and the machine header to PATH")
    args = p.parse_args(argv)
    machine = describe_machine("cpu")
    print_header(machine)
    results = {"setup": {"model": "llama.py default preset", "batch_size": 1, "prompt_tokens": args.prompt_tokens,
                         "new_tokens": args.new_tokens, "repeats": args.repeats}}
    for dtype in args.dtype:
        results[dtype] = measure(args, dtype)
    write_json(args.json, machine, results)


if __name__ == "__main__":
    main()
