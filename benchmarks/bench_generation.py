"""Greedy decoding speed: our fast decoding and KV cache vs recomputing the prefix vs Hugging Face's generate.

All of them run the same random weights of llama.py's default model (max_seq_len raised so 256 new tokens
fit), batch 1, in one process, alternating, and the median of several repetitions is reported, for each
dtype asked for (the weights of both models in that dtype).

    python benchmarks/bench_generation.py [--new-tokens 256] [--repeats 5] [--dtype fp32 bf16] [--json PATH]

With --hf-model DIR (a pretrained Llama folder, e.g. from tools/get_smollm2.py), that checkpoint instead:
ours (extras/fast_decoding.py, on each backend) against Hugging Face's generate, 64 new tokens, median of 3; the
machine's read bandwidth, the bytes of weights a token reads and the speed they allow; and, given a
llama-bench binary, llama.cpp on the same weights as a peer (F32 and BF16 GGUF files, given with --gguf or
converted from DIR with the convert_hf_to_gguf.py of a llama.cpp source folder, --llama-cpp):

    python benchmarks/bench_generation.py --hf-model /tmp/smollm2 \\
        --llama-bench LLAMA_CPP/build/bin/llama-bench --llama-cpp LLAMA_CPP --json bench.json
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import llama  # noqa: E402
import llama_generation as gen  # noqa: E402
import trainkit  # noqa: E402
from extras import llama_hf  # noqa: E402
from extras.fast_decoding import FastDecoder, usable_backends  # noqa: E402
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

    decoders = fast_decoders(model, DTYPES[dtype])
    runners = {
        **{f"ours, fast, {backend}": greedy(decoder, prompt, args.new_tokens) for backend, decoder in decoders.items()},
        "ours, KV cache": lambda: gen.generate_tokens(model, prompt, args.new_tokens, gen.pick_greedy)[0],
        "ours, recompute prefix": lambda: gen.generate_tokens(model, prompt, args.new_tokens, gen.pick_greedy,
                                                              use_cache=False)[0],
        "HF generate, cache": hf_generate,
        # Not a baseline: Hugging Face's model on the decoding kernels our KV cache chose (PyTorch's own
        # matrix-vector kernels), to show how much of our lead is that choice.
        "HF generate, oneDNN off": hf_generate_onednn_off,
    }
    same, times = race(runners, args.repeats, "HF generate, cache")
    print(f"\n{dtype}: {model.num_params() / 1e6:.1f}M parameters (default preset), batch 1, "
          f"{args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, median of {args.repeats}")
    rates = print_rates(times, args.new_tokens, "HF generate, cache", same)
    kernels = decoders["PyTorch"].kernels_for(1)  # measured once per process: what the PyTorch steps ran on
    print(kernels.describe())
    return {"same_tokens_as_hf": same, "decoding": rates,
            "kernels": {"onednn": kernels.onednn, "transposed_output": kernels.transposed_output,
                        "ms_per_step": {kernels.name(k): ms for k, ms in kernels.ms_per_step.items()}}}


def fast_decoders(model: llama.Transformer, dtype: torch.dtype) -> dict[str, FastDecoder]:
    """Our fast decoding on each backend that can run here: "PyTorch", and "C kernels" (extras/step_kernels.c)
    where a C compiler built them."""
    names = {"torch": "PyTorch", "c": "C kernels"}
    return {names[b]: FastDecoder(model, dtype, b) for b in usable_backends(model)}


def greedy(decoder, prompt: torch.Tensor, new_tokens: int):
    return lambda: gen.generate_tokens(decoder, prompt, new_tokens, gen.pick_greedy)[0]


def race(runners: dict, repeats: int, reference: str, outputs: Optional[dict] = None) -> tuple[dict, dict]:
    """Run each once (warm-up; how many of the tokens, from the first, are `reference`'s?), then `repeats`
    rounds, taking turns. `outputs`, if given, receives each one's tokens."""
    outputs = {} if outputs is None else outputs
    outputs.update({name: run() for name, run in runners.items()})
    same = {name: same_start(o, outputs[reference]) for name, o in outputs.items()}
    times = {name: [] for name in runners}
    with torch.inference_mode():
        for _ in range(repeats):
            for name, run in runners.items():
                t0 = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - t0)
    return same, times


def same_start(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many tokens a and b (1, n) share before they first differ."""
    n = min(a.shape[1], b.shape[1])
    differ = (a[:, :n] != b[:, :n])[0].nonzero()
    return int(differ[0]) if len(differ) else n


def print_rates(times: dict, new_tokens: int, reference: str, same: dict) -> dict:
    """Tokens/s of each (median), its ratio to `reference`'s, and how many of its tokens are reference's."""
    ref_rate = new_tokens / statistics.median(times[reference])
    rates = {}
    for name, ts in times.items():
        rate = new_tokens / statistics.median(ts)
        rates[name] = {"tokens_per_s": rate, "ratio_to_hf": rate / ref_rate, "same_tokens_as_hf": same[name]}
        print(f"{name:>24}: {rate:7.1f} tokens/s   {rate / ref_rate:5.2f}x HF   "
              f"tokens: {'all' if same[name] == new_tokens else f'first {same[name]}'} of {new_tokens} as HF's")
    return rates


# ----------------------------------------------------------------------------------------------------
# A pretrained checkpoint (--hf-model), with the memory bound and llama.cpp beside it


def read_bandwidth(gib: int = 1, repeats: int = 5) -> float:
    """Bytes/s the CPU reads memory at here: the best of a few sums over a float32 tensor far larger than
    any cache. A decoding step reads every weight once, so this bounds its speed."""
    x = torch.ones(gib * 2**28)
    x.sum()
    best = min(timed(x.sum) for _ in range(repeats))
    return x.numel() * 4 / best


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def weight_bytes_per_token(model: llama.Transformer, dtype: torch.dtype) -> int:
    """Bytes of weights a decoding step reads: every matrix once, in `dtype` (the embedding is one row,
    unless it is also the output matrix); the norms' float32 vectors."""
    matrices = sum(p.numel() for p in model.parameters() if p.dim() == 2)
    if not model.params.tie_embeddings:
        matrices -= model.tok_embeddings.weight.numel()
    vectors = sum(p.numel() for p in model.parameters() if p.dim() == 1)
    return matrices * dtype.itemsize + vectors * 4


def measure_hf_model(args, dtype: str, bandwidth: float, fp32_tokens: Optional[torch.Tensor] = None) -> dict:
    """Ours on each backend against HF generate on the checkpoint in `dtype`; fp32_tokens, HF's greedy tokens
    in float32, to say how far each one's tokens in bfloat16 follow them."""
    from transformers import LlamaForCausalLM

    model, _ = llama_hf.load_hf_model(args.hf_model, "cpu", args.prompt_tokens + args.new_tokens, DTYPES[dtype])
    hf = LlamaForCausalLM.from_pretrained(args.hf_model, dtype=DTYPES[dtype]).eval()
    decoders = fast_decoders(model, DTYPES[dtype])
    prompt = torch.randint(0, model.params.vocab_size, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    runners = {
        **{f"ours, {backend}": greedy(decoder, prompt, args.new_tokens) for backend, decoder in decoders.items()},
        "HF generate": lambda: hf.generate(prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                           do_sample=False, eos_token_id=None, pad_token_id=0)[:, prompt.shape[1]:],
        # the prompt alone, to take its time out of ours for the comparison with llama-bench, which counts none
        **{f"ours, {backend}: prompt": greedy(decoder, prompt, 0) for backend, decoder in decoders.items()},
    }
    outputs = {}
    same, times = race(runners, args.repeats, "HF generate", outputs)
    prompt_times = {name.removesuffix(": prompt"): times.pop(name) for name in list(times) if name.endswith(": prompt")}
    print(f"\n{dtype}: {args.hf_model}, {model.num_params() / 1e6:.1f}M parameters, batch 1, {args.prompt_tokens}-token "
          f"prompt, {args.new_tokens} new tokens, median of {args.repeats}")
    rates = print_rates(times, args.new_tokens, "HF generate", same)
    if fp32_tokens is not None:
        follow = {name: same_start(outputs[name], fp32_tokens) for name in times}
        print("the first tokens the same as HF's in float32: " + ", ".join(f"{n} {k}" for n, k in follow.items()))
        for name, k in follow.items():
            rates[name]["same_tokens_as_hf_fp32"] = k
    for name, ts in prompt_times.items():  # new_tokens - 1 steps: the first new token comes from the prompt's logits
        steps = (args.new_tokens - 1) / (statistics.median(times[name]) - statistics.median(ts))
        rates[name]["steps_tokens_per_s"] = steps
        print(f"{name:>24}: {steps:7.1f} tokens/s in its decoding steps alone (the prompt's "
              f"{1e3 * statistics.median(ts):.0f} ms taken out)")
    for decoder in decoders.values():
        print(decoder.describe())
    per_token = weight_bytes_per_token(model, DTYPES[dtype])
    bound = bandwidth / per_token
    print(f"{per_token / 1e6:.0f} MB of weights per token: at most {bound:.1f} tokens/s at {bandwidth / 1e9:.1f} GB/s; "
          + ", ".join(f"{name} {r['tokens_per_s'] / bound:.0%}" for name, r in rates.items()) + " of it")
    return {"decoding": rates, "weight_bytes_per_token": per_token, "bound_tokens_per_s": bound,
            "kernels": {name: d.describe() for name, d in decoders.items()}, "hf_tokens": outputs["HF generate"]}


GGUF_TYPES = {"fp32": "f32", "bf16": "bf16"}


def gguf_files(args, tmp: Path) -> dict[str, Path]:
    """dtype -> GGUF file: the ones given with --gguf, else DIR converted by llama.cpp's own script."""
    if args.gguf:
        return dict(zip(args.dtype, map(Path, args.gguf)))
    if not args.llama_cpp:
        return {}
    files = {}
    for dtype in args.dtype:
        files[dtype] = tmp / f"model-{GGUF_TYPES[dtype]}.gguf"
        subprocess.run([sys.executable, str(Path(args.llama_cpp) / "convert_hf_to_gguf.py"), args.hf_model,
                        "--outtype", GGUF_TYPES[dtype], "--outfile", str(files[dtype])],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return files


def llama_bench(binary: str, gguf: Path, new_tokens: int, threads: int) -> float:
    """Tokens/s of llama.cpp generating new_tokens tokens after an empty prompt (`-p 0 -n N`), its mean."""
    out = subprocess.run([binary, "-m", str(gguf), "-p", "0", "-n", str(new_tokens), "-t", str(threads),
                          "-o", "json"], check=True, capture_output=True, text=True).stdout
    return float(json.loads(out)[0]["avg_ts"])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--new-tokens", type=int, help="default 256, with --hf-model 64")
    p.add_argument("--prompt-tokens", type=int, default=8)
    p.add_argument("--repeats", type=int, help="default 5, with --hf-model 3")
    p.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=list(DTYPES), help="both models' weights")
    p.add_argument("--json", metavar="PATH", help="also write the figures and the machine header to PATH")
    p.add_argument("--hf-model", metavar="DIR", help="a pretrained Llama folder to decode instead of random weights")
    p.add_argument("--llama-bench", metavar="PATH", help="with --hf-model: llama.cpp's llama-bench, run as a peer")
    p.add_argument("--gguf", nargs="+", metavar="FILE", help="GGUF files of the model, one per --dtype, in order")
    p.add_argument("--llama-cpp", metavar="DIR", help="a llama.cpp source folder: its convert_hf_to_gguf.py "
                   "makes the GGUF files (needs gguf and sentencepiece: requirements-extras.txt)")
    args = p.parse_args(argv)
    real = args.hf_model is not None
    args.new_tokens = args.new_tokens or (64 if real else 256)
    args.repeats = args.repeats or (3 if real else 5)
    if args.gguf and len(args.gguf) != len(args.dtype):
        p.error(f"--gguf needs one file per --dtype ({' '.join(args.dtype)})")
    machine = describe_machine("cpu")
    print_header(machine)
    results = {"setup": {"model": args.hf_model or "llama.py default preset", "batch_size": 1,
                         "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
                         "repeats": args.repeats}}
    if not real:
        for dtype in args.dtype:
            results[dtype] = measure(args, dtype)
        write_json(args.json, machine, results)
        return
    bandwidth = read_bandwidth()
    print(f"read bandwidth: {bandwidth / 1e9:.1f} GB/s (sum over a 1 GiB tensor, best of 5)")
    results["read_bandwidth_gb_s"] = bandwidth / 1e9
    for dtype in args.dtype:
        fp32_tokens = results["fp32"].get("hf_tokens") if "fp32" in results else None
        results[dtype] = measure_hf_model(args, dtype, bandwidth, fp32_tokens)
    for dtype in args.dtype:
        results[dtype].pop("hf_tokens", None)
    if args.llama_bench:
        with tempfile.TemporaryDirectory() as tmp:
            for dtype, gguf in gguf_files(args, Path(tmp)).items():
                rate = llama_bench(args.llama_bench, gguf, args.new_tokens, torch.get_num_threads())
                bound = results[dtype]["bound_tokens_per_s"]
                ours = {name: r["steps_tokens_per_s"] for name, r in results[dtype]["decoding"].items()
                        if "steps_tokens_per_s" in r}
                print(f"llama.cpp {GGUF_TYPES[dtype].upper()}: {rate:.1f} tokens/s ({rate / bound:.0%} of the bound) "
                      f"[llama-bench -p 0 -n {args.new_tokens} -t {torch.get_num_threads()}]; decoding steps alone: "
                      + ", ".join(f"{name} {r:.1f} tokens/s = {r / rate:.2f}x" for name, r in ours.items()))
                results[dtype]["llama_cpp_tokens_per_s"] = rate
    write_json(args.json, machine, results)


if __name__ == "__main__":
    main()
