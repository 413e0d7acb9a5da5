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
    python llama_generation.py --strategy top_p --show-probs              # what each strategy keeps, step by step

--hf-model, --show-probs and checkpoints that are a bare state_dict are the tool's (extras/).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import llama
import trainkit
from llama import KVCache, Transformer
from trainkit import UserError

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

    def warp(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits the next token is drawn from: float32, divided by the temperature, then filtered."""
        logits = logits.float() / self.temperature
        if self.strategy == "top_k":
            logits = filter_top_k(logits, min(self.top_k, logits.size(-1)))
        elif self.strategy == "top_p":
            logits = filter_top_p(logits, self.top_p)  # the nucleus of the tempered distribution
        return logits

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.strategy == "greedy":
            return pick_greedy(logits)
        # Hugging Face's order and arithmetic: float32 logits divided by the temperature, then the filter, then
        # one torch.multinomial draw from the softmax. With the same seed, generate(do_sample=True) then draws
        # the same tokens from the same logits (it uses the global generator, ours one seeded with the same seed).
        if self.strategy == "sample":  # nothing to filter: the temperature exercise does all of it
            return sample_with_temperature(logits, self.temperature, self.generator)
        return sample_with_temperature(self.warp(logits), 1.0, self.generator)


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
    # The next token is chosen from float32 logits, as Hugging Face's generate does, so that both choose the same
    # token from the same logits whatever dtype the model computes in.
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
             num_samples: int = 1, stream: Optional[Callable[[str], None]] = None, chat: bool = False,
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
            text = tokenizer.decode(pieces, skip_special_tokens=True)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                stream(text[shown[0]:])
                shown[0] = len(text)

    pick_next = sampler
    if on_choice is not None:
        def pick_next(logits):
            nxt = sampler(logits)
            on_choice(logits, nxt, sampler)
            return nxt

    stop_id = tokenizer.eos_token_id
    if chat:  # the assistant's answer ends at the template's end-of-turn token (extras/llama_hf.py)
        from extras.llama_hf import end_of_turn_id

        stop_id = end_of_turn_id(tokenizer)
    # The decoding steps run on fast_decoder(model): the same tokens, with the per-step work done once up front.
    new, reason = generate_tokens(fast_decoder(model), prompt_ids, max_length, pick_next, stop_id, on_token=on_token,
                                  n_pad=n_pad)
    texts = [tokenizer.decode([t for t in row if t != stop_id], skip_special_tokens=True) for row in new.tolist()]
    return texts, reason



def fast_decoder(model: Transformer):
    """The model as the decoding loop drives it fastest (extras/fast_decoding.py: fused matrices, kernels and
    weights' dtype measured on this machine), built once per model; in float32 the same tokens as the model."""
    from extras.fast_decoding import fast_decoder

    return fast_decoder(model)


# The course's four entry points, one per strategy: a prompt in, its continuation (without the prompt) out.

def generate_text_greedy(model, tokenizer, prompt, device, max_length=50, temperature=1.0):
    """The most likely token at every step. `temperature` is accepted so the four functions take the same
    arguments, but it cannot change the result: argmax(logits / T) is argmax(logits) for every T > 0."""
    return generate(model, tokenizer, prompt, device, max_length, "greedy", temperature)[0][0]


def generate_text_sampling(model, tokenizer, prompt, device, max_length=50, temperature=1.0, seed=None):
    """A draw from softmax(logits / temperature) at every step; the same seed gives the same text."""
    return generate(model, tokenizer, prompt, device, max_length, "sample", temperature, seed=seed)[0][0]


def generate_text_topk(model, tokenizer, prompt, device, max_length=50, temperature=1.0, top_k=50, seed=None):
    """A draw from the top_k most likely tokens, after the temperature; top_k=1 is greedy."""
    return generate(model, tokenizer, prompt, device, max_length, "top_k", temperature, top_k=top_k, seed=seed)[0][0]


def generate_text_topp(model, tokenizer, prompt, device, max_length=50, temperature=1.0, top_p=0.9, seed=None):
    """A draw from the nucleus: the most likely tokens holding top_p of the tempered probability mass."""
    return generate(model, tokenizer, prompt, device, max_length, "top_p", temperature, top_p=top_p, seed=seed)[0][0]


# ----------------------------------------------------------------------------------------------------
# The command line


def parse_args(argv=None) -> argparse.Namespace:
    p = trainkit.OneLineParser(description="Generate text with the LLaMA trained by llama.py.",
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", default=llama.CHECKPOINT, help="written by llama.py")
    p.add_argument("--tokenizer", help="Hub name or local folder (default: the one recorded in the checkpoint)")
    p.add_argument("--prompt", nargs="+", default=["In a world where"], help="one or more, decoded as one batch")
    p.add_argument("--strategy", choices=STRATEGIES + ("all",), default="all", help="'all': one continuation each")
    p.add_argument("--max-new-tokens", type=int, default=60)
    p.add_argument("--temperature", type=float, default=0.8, help="for the sampling strategies")
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0, help="sampling is reproducible for a given seed")
    p.add_argument("--num-samples", type=int, default=1, help="continuations per strategy")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto")
    p.add_argument("--show-probs", type=int, nargs="?", const=3, default=0, metavar="STEPS",
                   help="the likeliest next tokens before and after the strategy, for the first STEPS (3) steps")
    r = p.add_argument_group("real weights")
    r.add_argument("--hf-model", metavar="NAME_OR_DIR", help="a Hugging Face LlamaForCausalLM instead of --checkpoint")
    r.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    bare = p.add_argument_group("for a checkpoint that is a bare state_dict, without its ModelArgs")
    bare.add_argument("--n-heads", type=int)
    bare.add_argument("--n-kv-heads", type=int)
    bare.add_argument("--max-seq-len", type=int, help="with --hf-model: the KV cache's positions (up to 4096)")
    bare.add_argument("--multiple-of", type=int)
    return p.parse_args(argv)


def load_model(args, device) -> tuple[Transformer, object]:
    """The model and its tokenizer: a checkpoint saved by llama.py or, through the tool (extras/llama_commands.py),
    a Hugging Face Llama or a bare state_dict."""
    if args.hf_model:
        from extras.llama_commands import load_hf_for_generation

        return load_hf_for_generation(args, device)
    ckpt = trainkit.read_checkpoint(args.checkpoint, llama.TRAIN_FIRST)
    if "model_args" in ckpt and "model" in ckpt:
        model = llama.build_model(ckpt["model_args"], ckpt["model"], args.checkpoint)
    else:
        from extras.llama_commands import load_bare_state_dict

        model = load_bare_state_dict(ckpt, args.checkpoint, args)
    return model.to(device), llama.tokenizer_for(model, args.tokenizer or ckpt.get("tokenizer") or "gpt2")


def main(argv=None) -> int:
    args = parse_args(argv)
    with trainkit.one_line_errors("llama_generation.py"):
        if args.max_new_tokens < 1 or args.num_samples < 1:
            raise UserError("--max-new-tokens and --num-samples must be at least 1")
        if args.show_probs < 0:
            raise UserError(f"--show-probs takes a number of steps >= 0, got {args.show_probs}")
        strategies = STRATEGIES if args.strategy == "all" else (args.strategy,)
        for strategy in strategies:
            Sampler(strategy, args.temperature, args.top_k, args.top_p)  # check the flags before loading anything
        device = trainkit.pick_device(args.device)
        model, tokenizer = load_model(args, device)
        chat = args.chat and tokenizer.chat_template is not None
        if args.chat and not chat:
            print("note: the tokenizer has no chat template; --chat is ignored", file=sys.stderr)
        print(fast_decoder(model).describe(len(args.prompt) * args.num_samples), file=sys.stderr)
        apart = "\n" if chat else ""  # a chat's answer goes on a line of its own
        for strategy in strategies:
            on_choice = None
            if args.show_probs:  # the candidates table of the first steps (extras/show_probs.py)
                from extras.show_probs import show_probs

                on_choice = show_probs(args.show_probs, tokenizer)
            print(f"=== {strategy} ===")
            print(args.prompt[0], end=apart, flush=True)
            stream = lambda piece: print(piece, end="", flush=True)  # noqa: E731
            texts, reason = generate(model, tokenizer, args.prompt, device, args.max_new_tokens, strategy,
                                     args.temperature, args.top_k, args.top_p, args.seed, args.num_samples, stream,
                                     chat, on_choice)
            print()
            for i, text in enumerate(texts[1:], start=1):  # the rest of the batch, after the streamed first
                prompt_index, sample = divmod(i, args.num_samples)
                label = f"sample {sample + 1}" + (f" of prompt {prompt_index + 1}" if len(args.prompt) > 1 else "")
                print(f"--- {label} ---\n{args.prompt[prompt_index]}{apart}{text}")
            print(f"[stopped: {reason}]\n")
    return 0


if __name__ == "__main__":
    import llama_generation  # one module object, whether run as a script or imported by the tool (extras/, tests)

    sys.exit(llama_generation.main())
