"""tools/perplexity_breakdown.py: its split of the loss agrees with llama.evaluate and with a direct count."""

import math
import re
import sys
from pathlib import Path

import pytest
import torch

import llama
from extras import llama_commands
from helpers import call_main

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import perplexity_breakdown  # noqa: E402


@pytest.mark.needs("rmsnorm", "swiglu", "causal_mask")
def test_breakdown_matches_evaluate_and_counts_unseen_tokens(tmp_path, tiny_wikitext_dir, tiny_tokenizer_dir, capsys):
    ckpt = tmp_path / "model.pth"
    flags = ["--data-dir", tiny_wikitext_dir, "--tokenizer", tiny_tokenizer_dir]
    code, _, _ = call_main(llama.main, ["--preset", "smoke", *flags, "--checkpoint", str(ckpt), "--output-dir",
                                        str(tmp_path), "--precision", "fp32"], capsys)
    assert code == 0
    code, out, _ = call_main(perplexity_breakdown.main, ["--checkpoint", str(ckpt), *flags], capsys)
    assert code == 0

    model, _ = llama_commands.load_checkpoint(str(ckpt))
    streams = llama.tokenize_splits(llama.load_wikitext(tiny_wikitext_dir), llama.load_tokenizer(tiny_tokenizer_dir))
    val, train_ids = streams["validation"], set(streams["train"].tolist())
    unseen = sum(t not in train_ids for t in val[1:].tolist())
    assert re.search(rf"never in training: {unseen:,} tokens", out)
    perplexity = float(re.search(r"all: +mean loss [\d.]+ nats, perplexity ([\d.]+)", out).group(1))
    assert math.isclose(perplexity, math.exp(llama.evaluate(model, val, torch.device("cpu"))), rel_tol=1e-4, abs_tol=0.051)  # printed to 0.1
