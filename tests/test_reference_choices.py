"""The reference solutions' own choices where correct solutions differ: tested here, ungraded.

The exercises' graded tests (tests/grading.py) accept every correct solution. Where the solutions at the
repository root go further than that — keeping every token tied at the top-k or top-p boundary, clamping k to
the vocabulary size, leaving the logits they are given as they are, promoting a bf16 input to float32 times a
float32 weight, applying attention dropout — these tests hold them to it. They carry no exercise marker, and
on a student's copy (`pytest --impl DIR`) they are skipped: a student is not graded on them.
"""

from pathlib import Path

import pytest
import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

import grading
import llama
import llama_generation as gen
import transformer as T

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(Path(llama.__file__).resolve().parent != ROOT,
                                reason="the reference solutions' own choices; a student's copy is not graded on them")


def test_filter_top_p_keeps_every_token_tied_with_the_last_one_kept():
    # probabilities 0.4, 0.3, 0.3: p = 0.5 needs the first and one 0.3; HF keeps whichever its sort puts first,
    # the reference keeps both, so its result never depends on the order of the tokens.
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.3]]))
    ours = grading.kept(gen.filter_top_p(logits.clone(), 0.5))
    theirs = grading.kept(TopPLogitsWarper(top_p=0.5)(None, logits.clone()))
    assert theirs.sum() == 2 and bool((theirs <= ours).all()) and ours.sum() == 3


def test_filter_top_k_keeps_every_token_tied_with_the_kth_exactly_as_hf():
    logits = torch.randint(0, 4, (6, 30), generator=torch.Generator().manual_seed(1)).float()
    for k in (1, 3, 10):
        assert torch.equal(gen.filter_top_k(logits.clone(), k), TopKLogitsWarper(top_k=k)(None, logits.clone()))


@pytest.mark.parametrize("k", [201, 500])
def test_filter_top_k_with_k_above_the_vocabulary_keeps_everything_like_hf(k):
    logits = grading.random_logits(vocab=200)
    assert torch.equal(gen.filter_top_k(logits.clone(), k), TopKLogitsWarper(top_k=k)(None, logits.clone()))
    assert torch.equal(gen.filter_top_k(logits.clone(), k), logits)


def test_the_filters_and_sampling_leave_their_input_as_it_is():
    logits = grading.random_logits()
    before = logits.clone()
    gen.filter_top_k(logits, 5)
    gen.filter_top_p(logits, 0.5)
    gen.sample_with_temperature(logits, 0.7, torch.Generator().manual_seed(0))
    assert torch.equal(logits, before)


def test_rmsnorm_of_a_bf16_input_times_a_float32_weight_is_float32():
    x = torch.randn(2, 5, 8).bfloat16()
    assert llama.RMSNorm(8)(x).dtype == torch.float32  # bf16 input times an fp32 weight promotes


def test_attention_applies_attention_dropout_in_training():
    # Every attention weight dropped: the output is the output projection's bias alone.
    attn = T.MultiHeadSelfAttention(16, 2, attention_dropout=1.0).train()
    out = attn(torch.randn(2, 5, 16))
    assert torch.allclose(out, attn.proj.bias.expand_as(out))
