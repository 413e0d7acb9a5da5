"""Day 2, part 2: generate text with the LLaMA trained by llama.py.

A language model gives, for a prefix, a distribution over the next token. Generating is choosing a token
from it, appending it, and asking again. The strategies differ only in how they choose:

    greedy    the most likely token                          (deterministic, tends to repeat itself)
    sample    a draw from softmax(logits / temperature)      (temperature < 1 sharpens, > 1 flattens)
    top_k     a draw from the k most likely tokens only      (Fan et al., 2018)
    top_p     a draw from the smallest set holding p of the probability mass  (nucleus; Holtzman et al., 2019)

With a KV cache each new token costs one position of compute: the keys and values of the prefix are kept
from the previous steps instead of being recomputed.

    python llama_generation.py                                  # after `python llama.py`
    python llama_generation.py --tokenizer ../shared/data/gpt2-tokenizer --prompt "The river" --strategy top_p
    python llama_generation.py --hf-model HuggingFaceTB/SmolLM2-135M      # real weights in our Transformer
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from llama import (CHECKPOINT, KVCache, Transformer, UserError, build_model, decoding_kernels, load_hf_model,
                   load_tokenizer, pick_device, read_checkpoint)

STRATEGIES = ("greedy", "sample", "top_k", "top_p")


# ----------------------------------------------------------------------------------------------------
# Choosing the next token: pure functions of the logits (batch, vocab)


def pick_greedy(logits: torch.Tensor) -> torch.Tensor:
    """The worked example: the most likely token of each row, shape (batch, 1)."""
    return logits.argmax(dim=-1, keepdim=True)


def sample_with_temperature(logits: torch.Tensor, temperature: float = 1.0,
                            generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Draw one token per row from softmax(logits / temperature); shape (batch, 1).

    Removed tokens (logit -inf) have probability exp(-inf) = 0 and are never drawn.
    """
    # EXERCISE temperature_sampling: divide the logits by the temperature, softmax, then torch.multinomial(..., 1, generator=generator)
    probs = F.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)
    # END EXERCISE


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (and any tied with the k-th); set the rest to -inf.

    Keeping exactly k of the tied ones is correct too; the Sampler never passes k above the vocabulary size.
    """
    # EXERCISE top_k: find the k-th largest logit of each row (torch.topk) and mask everything below it with -inf
    k = min(k, logits.size(-1))
    kth_largest = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth_largest, float("-inf"))
    # END EXERCISE


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the most likely tokens until their probabilities add up to p; the rest -> -inf.

    A token is kept when the tokens more likely than it hold less than p of the mass, so the most likely
    token always stays. Tokens tied with the last one kept are kept too, whatever their order (Hugging Face
    keeps only as many as the mass needs: correct too).
    """
    # EXERCISE top_p: sort the probabilities in descending order, keep a token while the mass before it is < p, mask the rest with -inf
    if p >= 1.0:  # everything; float rounding of the cumulative sum must not drop the tail
        return logits
    probs = F.softmax(logits.float(), dim=-1)
    sorted_probs = probs.sort(dim=-1, descending=True).values
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    n_keep = (mass_before < p).sum(dim=-1, keepdim=True).clamp(min=1)
    smallest_kept = sorted_probs.gather(-1, n_keep - 1)
    return logits.masked_fill(probs < smallest_kept, float("-inf"))
    # END EXERCISE


@dataclass
class Sampler:
    """How to choose the next token: one of STRATEGIES with its settings and a seeded generator."""

    strategy: str = "greedy"
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 0.9
    generator: Optional[torch.Generator] = None

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise UserError(f"unknown strategy '{self.strategy}'; choose one of {', '.join(STRATEGIES)}")
        if self.strategy != "greedy" and not self.temperature > 0:
            raise UserError(f"--temperature must be > 0 for sampling, got {self.temperature} (use --strategy greedy "
                            "for the most likely token)")
        if self.top_k < 1:
            raise UserError(f"--top-k must be at least 1, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p must be in (0, 1], got {self.top_p}")

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.strategy == "greedy":
            return pick_greedy(logits)
        # Hugging Face's order and arithmetic: float32 logits divided by the temperature, then the filter, then
        # one torch.multinomial draw from the softmax. With the same seed, generate(do_sample=True) then draws
        # the same tokens from the same logits (it uses the global generator, ours one seeded with the same seed).
        if self.strategy == "sample":  # nothing to filter: the temperature exercise does all of it
            return sample_with_temperature(logits, self.temperature, self.generator)
        logits = logits.float() / self.temperature
        if self.strategy == "top_k":
            logits = filter_top_k(logits, min(self.top_k, logits.size(-1)))
        elif self.strategy == "top_p":
            logits = filter_top_p(logits, self.top_p)  # the nucleus of the tempered distribution
        return sample_with_temperature(logits, 1.0, self.generator)


# ----------------------------------------------------------------------------------------------------
# Seeing what a strategy keeps (--show-probs)


def sampling_distribution(logits: torch.Tensor, sampler: Sampler) -> torch.Tensor:
    """The probabilities (batch, vocab) that `sampler` draws the next token from: softmax of the logits after
    its temperature and filter, the same steps as Sampler.__call__; greedy puts all the mass on the argmax.
    A token the filter removed has probability exactly 0; the others are renormalised to sum to 1."""
    if sampler.strategy == "greedy":
        return F.one_hot(pick_greedy(logits)[..., 0], logits.shape[-1]).float()
    logits = logits.float() / sampler.temperature
    if sampler.strategy == "top_k":
        logits = filter_top_k(logits, min(sampler.top_k, logits.size(-1)))
    elif sampler.strategy == "top_p":
        logits = filter_top_p(logits, sampler.top_p)
    return F.softmax(logits, dim=-1)


@dataclass
class Candidate:
    """One row of the --show-probs table."""

    token: int
    p_model: float  # softmax(logits): what the model says
    p_tempered: float  # softmax(logits / temperature), before any filter (greedy: the model's)
    p_drawn: float  # what the sampler draws from, after temperature and filter; 0 when the filter cut it


def top_candidates(logits: torch.Tensor, sampler: Sampler, n: int = 10, also: Optional[int] = None) -> list[Candidate]:
    """The n most likely next tokens of one row of logits (vocab,), with their probabilities before and
    after the strategy's temperature and filter, most likely first; token `also` is added last if not among them."""
    logits = logits.float()
    p_model = F.softmax(logits, dim=-1)
    t = sampler.temperature if sampler.strategy != "greedy" else 1.0
    p_tempered = F.softmax(logits / t, dim=-1)
    p_drawn = sampling_distribution(logits[None], sampler)[0]
    top = torch.topk(p_model, min(n, logits.shape[-1])).indices.tolist()
    if also is not None and also not in top:
        top.append(also)
    return [Candidate(i, float(p_model[i]), float(p_tempered[i]), float(p_drawn[i])) for i in top]


def describe_strategy(sampler: Sampler) -> str:
    settings = {"greedy": "", "sample": f"temperature {sampler.temperature:g}",
                "top_k": f"temperature {sampler.temperature:g}, k {sampler.top_k}",
                "top_p": f"temperature {sampler.temperature:g}, p {sampler.top_p:g}"}[sampler.strategy]
    return sampler.strategy + (f" ({settings})" if settings else "")


def format_candidates(step: int, logits: torch.Tensor, sampler: Sampler, tokenizer, chosen: int,
                      n: int = 10) -> str:
    """The --show-probs table of one step; '>' marks the token that was drawn."""
    n_kept = int((sampling_distribution(logits[None].float(), sampler) > 0).sum())
    t = sampler.temperature if sampler.strategy != "greedy" else 1.0
    lines = [f"  step {step}, {describe_strategy(sampler)}: {n_kept:,} of {logits.shape[-1]:,} tokens can be drawn",
             f"      {'token':<18}{'p':>9}{f'p at T={t:g}':>13}{'drawn from':>12}"]
    for c in top_candidates(logits, sampler, n, also=chosen):
        drawn = f"{c.p_drawn:.4f}" if c.p_drawn > 0 else "cut"
        mark = ">" if c.token == chosen else " "
        lines.append(f"    {mark} {repr(tokenizer.decode([c.token]))[:18]:<18}{c.p_model:>9.4f}{c.p_tempered:>13.4f}"
                     f"{drawn:>12}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# The decoding loop


@torch.no_grad()
def generate_tokens(model: Transformer, prompt: torch.Tensor, max_new_tokens: int,
                    pick_next: Callable[[torch.Tensor], torch.Tensor], eos_id: Optional[int] = None,
                    use_cache: bool = True, on_token: Optional[Callable[[torch.Tensor], None]] = None,
                    n_pad: Optional[torch.Tensor] = None):
    """Extend prompt (batch, T) by up to max_new_tokens tokens; returns (new tokens (batch, n), stop reason).

    With the cache, the prompt is run once ("prefill") and then each step feeds only the newest token at
    position start_pos; without it, each step reruns the whole sequence. Stops when every row has produced
    eos_id ("eos"), at the model's max_seq_len ("max_seq_len"), or after max_new_tokens ("max_new_tokens").
    Rows that finished early are padded with eos_id. n_pad[i], if given, is how many tokens of row i are
    left padding (see pad_prompts); the model never attends to them.
    """
    model.eval()
    batch, start = prompt.shape
    max_len = model.params.max_seq_len
    if start >= max_len:
        raise UserError(f"the prompt has {start} tokens; the model's max_seq_len is {max_len}")

    def new_cache():
        cache = KVCache(model.params, batch, prompt.device, model.output.weight.dtype)
        if n_pad is not None:
            cache.pad_left(n_pad)
        return cache

    def whole(tokens):  # recompute every position; a throwaway cache carries the padding mask
        return model(tokens, 0, new_cache()) if n_pad is not None else model(tokens)

    cache = new_cache() if use_cache else None
    tokens = prompt
    # The next token is chosen from float32 logits, as Hugging Face's generate does: exact for greedy, and on a
    # CPU an argmax over 50k bf16 numbers takes about 3 times as long as converting them and taking it in fp32.
    logits = (model(prompt, 0, cache) if use_cache else whole(prompt))[:, -1].float()
    finished = torch.zeros(batch, 1, dtype=torch.bool, device=prompt.device)
    reason = "max_new_tokens"
    for _ in range(max_new_tokens):
        nxt = pick_next(logits)
        if eos_id is not None:
            nxt = nxt.masked_fill(finished, eos_id)
            finished |= nxt == eos_id
        tokens = torch.cat([tokens, nxt], dim=1)
        if on_token is not None:
            on_token(nxt)
        if eos_id is not None and bool(finished.all()):
            reason = "eos"
            break
        if tokens.shape[1] >= max_len:
            reason = "max_seq_len"
            break
        logits = (model(nxt, tokens.shape[1] - 1, cache) if use_cache else whole(tokens))[:, -1].float()
    return tokens[:, start:], reason


def pad_prompts(rows: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Token lists of different lengths as one (batch, longest) tensor, padded on the left so that every row
    ends where generation starts; returns it and each row's pad count (None when no row needs padding)."""
    longest = max(len(r) for r in rows)
    n_pad = torch.tensor([longest - len(r) for r in rows], device=device)
    tokens = torch.tensor([[pad_id] * (longest - len(r)) + r for r in rows], device=device)
    return tokens, (n_pad if bool(n_pad.any()) else None)


def encode_prompt(tokenizer, prompt: str, max_seq_len: int, chat: bool = False) -> list[int]:
    """Token ids of the prompt, with whatever the tokenizer adds itself (Llama's BOS; nothing for GPT-2).
    chat: the prompt as a user's message in the tokenizer's chat template, ready for the assistant's answer.
    An empty prompt starts from the end-of-text token, as GPT-2 does; a prompt too long for the model keeps
    its last max_seq_len - 1 tokens (with a note on stderr)."""
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]  # the template holds its own BOS
    else:
        ids = tokenizer(prompt)["input_ids"]
    if not ids:
        if tokenizer.eos_token_id is None:
            raise UserError("the prompt is empty and the tokenizer has no end-of-text token to start from")
        ids = [tokenizer.eos_token_id]
    if len(ids) >= max_seq_len:
        print(f"note: the prompt has {len(ids)} tokens; keeping its last {max_seq_len - 1} "
              f"(max_seq_len is {max_seq_len})", file=sys.stderr)
        ids = ids[-(max_seq_len - 1):]
    return ids


def generate(model: Transformer, tokenizer, prompt, device, max_length: int = 50, strategy: str = "greedy",
             temperature: float = 1.0, top_k: int = 50, top_p: float = 0.9, seed: Optional[int] = None,
             num_samples: int = 1, stream: Optional[Callable[[str], None]] = None,
             chat: bool = False,
             on_choice: Optional[Callable[[torch.Tensor, torch.Tensor, Sampler], None]] = None) -> tuple[list[str], str]:
    """Continue `prompt` (a string, or a list of them decoded as one batch) by up to max_length new tokens;
    returns (continuations, stop reason), num_samples per prompt, the first prompt's first.

    stream, if given, receives each new piece of text as it is decoded (first continuation only).
    chat: each prompt is wrapped in the tokenizer's chat template (see encode_prompt).
    on_choice(logits, chosen tokens, sampler), if given, is called at every step after the choice.
    """
    generator = torch.Generator(device=device)
    if seed is not None:
        generator.manual_seed(seed)
    sampler = Sampler(strategy, temperature, top_k, top_p, generator)
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    rows = [encode_prompt(tokenizer, p, model.params.max_seq_len, chat) for p in prompts for _ in range(num_samples)]
    pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0  # never attended to
    prompt_ids, n_pad = pad_prompts(rows, pad_id, device)
    shown, pieces = [0], []

    def on_token(nxt):
        if stream is not None:
            pieces.append(int(nxt[0]))
            text = tokenizer.decode(pieces)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                stream(text[shown[0]:])
                shown[0] = len(text)

    pick_next = sampler
    if on_choice is not None:
        def pick_next(logits):
            nxt = sampler(logits)
            on_choice(logits, nxt, sampler)
            return nxt

    new, reason = generate_tokens(model, prompt_ids, max_length, pick_next, tokenizer.eos_token_id, on_token=on_token,
                                  n_pad=n_pad)
    texts = [tokenizer.decode([t for t in row if t != tokenizer.eos_token_id]) for row in new.tolist()]
    return texts, reason


# The course's four entry points, one per strategy.

def generate_text_greedy(model, tokenizer, prompt, device, max_length=50, temperature=1.0):
    return generate(model, tokenizer, prompt, device, max_length, "greedy")[0][0]


def generate_text_sampling(model, tokenizer, prompt, device, max_length=50, temperature=1.0, seed=None):
    return generate(model, tokenizer, prompt, device, max_length, "sample", temperature, seed=seed)[0][0]


def generate_text_topk(model, tokenizer, prompt, device, max_length=50, temperature=1.0, top_k=50, seed=None):
    return generate(model, tokenizer, prompt, device, max_length, "top_k", temperature, top_k=top_k, seed=seed)[0][0]


def generate_text_topp(model, tokenizer, prompt, device, max_length=50, temperature=1.0, top_p=0.9, seed=None):
    return generate(model, tokenizer, prompt, device, max_length, "top_p", temperature, top_p=top_p, seed=seed)[0][0]


# ----------------------------------------------------------------------------------------------------
# Loading and the command line


def load_model(path: str, device, n_heads: Optional[int] = None, n_kv_heads: Optional[int] = None,
               max_seq_len: Optional[int] = None, multiple_of: Optional[int] = None) -> tuple[Transformer, dict]:
    """A checkpoint saved by llama.py carries its ModelArgs. A bare state_dict (the original course format)
    also loads: dim, n_layers and vocab_size are read off the weights' shapes, the rest comes from the flags."""
    ckpt = read_checkpoint(path, device)
    if isinstance(ckpt, dict) and "model_args" in ckpt and "model" in ckpt:
        return build_model(ckpt["model_args"], ckpt["model"], path).to(device), ckpt
    if not isinstance(ckpt, dict) or "tok_embeddings.weight" not in ckpt:
        raise UserError(f"{path} is neither a llama.py checkpoint nor a LLaMA state_dict")
    if n_heads is None:
        raise UserError(f"{path} is a bare state_dict without its ModelArgs; give --n-heads (and --n-kv-heads, "
                        "--max-seq-len, --multiple-of if they differ from the defaults) it was trained with")
    vocab_size, dim = ckpt["tok_embeddings.weight"].shape
    n_layers = len({k.split(".")[1] for k in ckpt if k.startswith("layers.")})
    tied = "output.weight" not in ckpt or torch.equal(ckpt["output.weight"], ckpt["tok_embeddings.weight"])
    args = dict(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=vocab_size,
                tie_embeddings=tied)
    args.update({k: v for k, v in dict(max_seq_len=max_seq_len, multiple_of=multiple_of).items() if v is not None})
    model = build_model(args, ckpt, path)
    return model.to(device), {"model_args": args}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Generate text with the LLaMA trained by llama.py.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", default=CHECKPOINT, help="written by llama.py")
    p.add_argument("--tokenizer", help="Hub name or local folder (default: the one recorded in the checkpoint)")
    p.add_argument("--prompt", nargs="+", default=["In a world where"],
                   help="one or more prompts, decoded together as one batch")
    p.add_argument("--strategy", choices=STRATEGIES + ("all",), default="all",
                   help="'all' prints one continuation per strategy")
    p.add_argument("--max-new-tokens", type=int, default=60)
    p.add_argument("--temperature", type=float, default=0.8, help="for the sampling strategies")
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0, help="sampling is reproducible for a given seed")
    p.add_argument("--num-samples", type=int, default=1, help="continuations per strategy")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto")
    p.add_argument("--show-probs", type=int, nargs="?", const=3, default=0, metavar="STEPS",
                   help="for the first STEPS steps (3 without a number) print the most likely next tokens with "
                        "their probabilities before and after the strategy's temperature and filter")
    r = p.add_argument_group("real weights")
    r.add_argument("--hf-model", metavar="NAME_OR_DIR", help="any Hugging Face LlamaForCausalLM (Hub name or local "
                   "folder) in our Transformer, with its own tokenizer, instead of --checkpoint")
    r.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template "
                   "(instruct models)")
    bare = p.add_argument_group("for a bare state_dict without ModelArgs (the original course format)")
    bare.add_argument("--n-heads", type=int)
    bare.add_argument("--n-kv-heads", type=int)
    bare.add_argument("--max-seq-len", type=int, help="with --hf-model: positions the KV cache holds (default: "
                      f"the model's max_position_embeddings, at most {HF_DEFAULT_CONTEXT})")
    bare.add_argument("--multiple-of", type=int)
    return p.parse_args(argv)


HF_DEFAULT_CONTEXT = 4096  # a Llama 3.2 allows 131,072 positions: 4 GiB of KV cache for the 1B model in bf16


def load_hf(args, device) -> tuple[Transformer, object]:
    """--hf-model: the checkpoint in our Transformer, in its own dtype where the device is fast in it (see
    llama.inference_dtype), and its tokenizer."""
    model, why = load_hf_model(args.hf_model, device, args.max_seq_len or HF_DEFAULT_CONTEXT)
    tokenizer = load_tokenizer(args.tokenizer or args.hf_model)
    print(f"{args.hf_model}: {model.num_params() / 1e6:.1f}M parameters, "
          f"{str(model.output.weight.dtype).removeprefix('torch.')} ({why}), context {model.params.max_seq_len}",
          file=sys.stderr)
    return model, tokenizer


def run(args) -> int:
    if args.max_new_tokens < 1 or args.num_samples < 1:
        raise UserError("--max-new-tokens and --num-samples must be at least 1")
    if args.show_probs < 0:
        raise UserError(f"--show-probs takes a number of steps >= 0, got {args.show_probs}")
    strategies = STRATEGIES if args.strategy == "all" else (args.strategy,)
    for strategy in strategies:
        Sampler(strategy, args.temperature, args.top_k, args.top_p)  # check the flags before loading anything
    device = pick_device(args.device)
    if args.hf_model:
        model, tokenizer = load_hf(args, device)
    else:
        model, ckpt = load_model(args.checkpoint, device, args.n_heads, args.n_kv_heads, args.max_seq_len,
                                 args.multiple_of)
        tokenizer = load_tokenizer(args.tokenizer or ckpt.get("tokenizer") or "gpt2")
    chat = args.chat and tokenizer.chat_template is not None
    if args.chat and not chat:
        print("note: the tokenizer has no chat template; --chat is ignored", file=sys.stderr)
    if len(tokenizer) > model.params.vocab_size:
        raise UserError(f"the tokenizer has {len(tokenizer)} tokens but the model was trained with "
                        f"{model.params.vocab_size}; pass the --tokenizer it was trained with")
    print(decoding_kernels(model, len(args.prompt) * args.num_samples).describe(), file=sys.stderr)
    for strategy in strategies:
        print(f"=== {strategy} ===")
        print(args.prompt[0], end="", flush=True)
        stream = lambda piece: print(piece, end="", flush=True)  # noqa: E731
        texts, reason = generate(model, tokenizer, args.prompt, device, args.max_new_tokens, strategy,
                                 args.temperature, args.top_k, args.top_p, args.seed, args.num_samples, stream,
                                 chat, show_probs(args.show_probs, tokenizer))
        print()
        for i, text in enumerate(texts[1:], start=1):  # the rest of the batch, after the streamed first
            prompt_index, sample = divmod(i, args.num_samples)
            label = f"sample {sample + 1}" + (f" of prompt {prompt_index + 1}" if len(args.prompt) > 1 else "")
            print(f"--- {label} ---\n{args.prompt[prompt_index]}{text}")
        print(f"[stopped: {reason}]\n")
    return 0


def show_probs(steps: int, tokenizer, n: int = 10):
    """An on_choice for generate() that prints the candidates table of the first row for the first `steps`
    steps (None when steps is 0). The text generated so far goes on streaming between the tables."""
    if steps <= 0:
        return None
    done = [0]

    def on_choice(logits, chosen, sampler):
        if done[0] < steps:
            done[0] += 1
            print("\n" + format_candidates(done[0], logits[0], sampler, tokenizer, int(chosen[0, 0]), n), flush=True)

    return on_choice


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        raise SystemExit(130)


if __name__ == "__main__":
    sys.exit(main())
