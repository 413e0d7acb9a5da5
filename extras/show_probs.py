"""Seeing what a strategy keeps: `python llama_generation.py --show-probs [STEPS]`.

For the first steps of a generation, the most likely next tokens with their probabilities as the model gives
them, after the temperature, and after the strategy's filter (what the token is really drawn from).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

import llama_generation as gen


def sampling_distribution(logits: torch.Tensor, sampler: gen.Sampler) -> torch.Tensor:
    """The probabilities (batch, vocab) that `sampler` draws the next token from: the softmax of its warped
    logits (temperature, then filter), the same steps as Sampler.__call__; greedy puts all the mass on the
    argmax. A token the filter removed has probability exactly 0; the others are renormalised to sum to 1."""
    if sampler.strategy == "greedy":
        return F.one_hot(gen.pick_greedy(logits)[..., 0], logits.shape[-1]).float()
    return F.softmax(sampler.warp(logits), dim=-1)


@dataclass
class Candidate:
    """One row of the --show-probs table."""

    token: int
    p_model: float  # softmax(logits): what the model says
    p_tempered: float  # softmax(logits / temperature), before any filter (greedy: the model's)
    p_drawn: float  # what the sampler draws from, after temperature and filter; 0 when the filter cut it


def top_candidates(logits: torch.Tensor, sampler: gen.Sampler, n: int = 10,
                   also: Optional[int] = None) -> list[Candidate]:
    """The n most likely next tokens of one row of logits (vocab,), with their probabilities before and
    after the strategy's temperature and filter, most likely first; token `also` is added last if not among them."""
    logits = logits.float()
    p_model = F.softmax(logits, dim=-1)
    p_tempered = F.softmax(logits / temperature_of(sampler), dim=-1)
    p_drawn = sampling_distribution(logits[None], sampler)[0]
    top = torch.topk(p_model, min(n, logits.shape[-1])).indices.tolist()
    if also is not None and also not in top:
        top.append(also)
    return [Candidate(i, float(p_model[i]), float(p_tempered[i]), float(p_drawn[i])) for i in top]


def temperature_of(sampler: gen.Sampler) -> float:
    return sampler.temperature if sampler.strategy != "greedy" else 1.0


def describe_strategy(sampler: gen.Sampler) -> str:
    settings = {"greedy": "", "sample": f"temperature {sampler.temperature:g}",
                "top_k": f"temperature {sampler.temperature:g}, k {sampler.top_k}",
                "top_p": f"temperature {sampler.temperature:g}, p {sampler.top_p:g}"}[sampler.strategy]
    return sampler.strategy + (f" ({settings})" if settings else "")


def format_candidates(step: int, logits: torch.Tensor, sampler: gen.Sampler, tokenizer, chosen: int,
                      n: int = 10) -> str:
    """The --show-probs table of one step; '>' marks the token that was drawn."""
    n_kept = int((sampling_distribution(logits[None].float(), sampler) > 0).sum())
    lines = [f"  step {step}, {describe_strategy(sampler)}: {n_kept:,} of {logits.shape[-1]:,} tokens can be drawn",
             f"      {'token':<18}{'p':>9}{f'p at T={temperature_of(sampler):g}':>13}{'drawn from':>12}"]
    for c in top_candidates(logits, sampler, n, also=chosen):
        drawn = f"{c.p_drawn:.4f}" if c.p_drawn > 0 else "cut"
        mark = ">" if c.token == chosen else " "
        lines.append(f"    {mark} {repr(tokenizer.decode([c.token]))[:18]:<18}{c.p_model:>9.4f}{c.p_tempered:>13.4f}"
                     f"{drawn:>12}")
    return "\n".join(lines)


def show_probs(steps: int, tokenizer, n: int = 10):
    """An on_choice for gen.generate() that prints the candidates table of the first row for the first `steps`
    steps. The text generated so far goes on streaming between the tables."""
    done = [0]

    def on_choice(logits, chosen, sampler):
        if done[0] < steps:
            done[0] += 1
            print("\n" + format_candidates(done[0], logits[0], sampler, tokenizer, int(chosen[0, 0]), n), flush=True)

    return on_choice
