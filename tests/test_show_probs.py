"""`llama_generation.py --show-probs` (extras/show_probs.py): the distribution the table shows against Hugging Face's warpers
(temperature, then top-k or top-p), the 'after' column zero exactly where the filter cut and renormalised
elsewhere, the Sampler's draws against that distribution, and the command line."""

import pytest
import torch
import torch.nn.functional as F
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

import llama_generation as gen
from extras import show_probs
from helpers import call_main
from test_generation import DAY2, checkpoint, tiny_model  # noqa: F401  (checkpoint is a fixture)


def random_logits(batch=3, vocab=60, scale=3.0, seed=0):
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def hf_distribution(logits, temperature, warper=None):
    warped = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if warper is not None:
        warped = warper(None, warped)
    return F.softmax(warped, dim=-1)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.7])
def test_sample_distribution_is_softmax_of_logits_over_temperature(temperature):
    logits = random_logits()
    got = show_probs.sampling_distribution(logits, gen.Sampler("sample", temperature))
    torch.testing.assert_close(got, hf_distribution(logits, temperature), rtol=0, atol=1e-6)


def test_greedy_distribution_puts_all_mass_on_the_argmax():
    logits = random_logits()
    got = show_probs.sampling_distribution(logits, gen.Sampler("greedy"))
    assert torch.equal(got, F.one_hot(logits.argmax(-1), logits.shape[-1]).float())


@pytest.mark.top_k
@pytest.mark.parametrize("k, temperature", [(1, 1.0), (5, 0.7), (17, 1.5), (60, 0.8), (100, 1.0)])
def test_top_k_distribution_equals_hf_temperature_then_top_k(k, temperature):
    logits = random_logits(seed=k)
    got = show_probs.sampling_distribution(logits, gen.Sampler("top_k", temperature, top_k=k))
    expected = hf_distribution(logits, temperature, TopKLogitsWarper(top_k=k))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@pytest.mark.top_p
@pytest.mark.parametrize("p, temperature", [(0.1, 1.0), (0.5, 0.7), (0.9, 1.5), (0.95, 0.8), (1.0, 1.0)])
def test_top_p_distribution_equals_hf_temperature_then_top_p(p, temperature):
    logits = random_logits(seed=int(100 * p))
    got = show_probs.sampling_distribution(logits, gen.Sampler("top_p", temperature, top_p=p))
    expected = hf_distribution(logits, temperature, TopPLogitsWarper(top_p=p))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@pytest.mark.needs("top_k", "top_p")
@pytest.mark.parametrize("sampler", [gen.Sampler("top_k", 0.8, top_k=7), gen.Sampler("top_p", 0.8, top_p=0.6),
                                     gen.Sampler("top_p", 1.3, top_p=0.9), gen.Sampler("sample", 0.8)],
                         ids=["top_k", "top_p 0.6", "top_p 0.9", "sample"])
def test_candidates_after_the_filter_are_zero_where_it_cut_and_renormalised_elsewhere(sampler):
    logits = random_logits(batch=1, vocab=40)[0]
    rows = show_probs.top_candidates(logits, sampler, n=40)  # every token: the whole table
    assert sorted(r.token for r in rows) == list(range(40))
    assert [r.p_model for r in rows] == sorted((r.p_model for r in rows), reverse=True)
    # the filter's own verdict, on the tempered logits as the Sampler applies it
    t = sampler.temperature
    if sampler.strategy == "top_k":
        survived = torch.isfinite(gen.filter_top_k(logits[None], sampler.top_k))[0]
    elif sampler.strategy == "top_p":
        survived = torch.isfinite(gen.filter_top_p(logits[None] / t, sampler.top_p))[0]
    else:
        survived = torch.ones(40, dtype=torch.bool)
    p_model = F.softmax(logits, -1)
    p_tempered = F.softmax(logits / t, -1)
    kept_mass = p_tempered[survived].sum()
    for r in rows:
        assert r.p_model == pytest.approx(float(p_model[r.token]), abs=1e-7)
        assert r.p_tempered == pytest.approx(float(p_tempered[r.token]), abs=1e-7)
        if survived[r.token]:
            assert r.p_drawn == pytest.approx(float(p_tempered[r.token] / kept_mass), rel=1e-5)
        else:
            assert r.p_drawn == 0.0
    assert sum(r.p_drawn for r in rows) == pytest.approx(1.0, abs=1e-5)
    if sampler.strategy != "sample":
        assert 0 < int(survived.sum()) < 40  # the cases cut something and keep something


def test_top_candidates_are_the_n_most_likely_and_add_the_chosen_token():
    logits = random_logits(batch=1)[0]
    rows = show_probs.top_candidates(logits, gen.Sampler("sample", 1.0), n=5)
    assert [r.token for r in rows] == torch.topk(logits, 5).indices.tolist()
    least = int(logits.argmin())
    rows = show_probs.top_candidates(logits, gen.Sampler("sample", 1.0), n=5, also=least)
    assert len(rows) == 6 and rows[-1].token == least


@pytest.mark.needs("temperature_sampling", "top_k", "top_p")
@pytest.mark.parametrize("sampler", [gen.Sampler("top_k", 0.8, top_k=3), gen.Sampler("top_p", 1.2, top_p=0.7)],
                         ids=["top_k", "top_p"])
def test_the_samplers_draws_follow_the_distribution_the_table_shows(sampler):
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.2, -0.5, -1.0]])
    sampler.generator = torch.Generator().manual_seed(0)
    draws = sampler(logits.repeat(20000, 1)).flatten()
    freq = torch.bincount(draws, minlength=6).float() / 20000
    shown = show_probs.sampling_distribution(logits, sampler)[0]
    assert bool((freq[shown == 0] == 0).all())  # a token shown as cut is never drawn
    torch.testing.assert_close(freq, shown, rtol=0, atol=0.015)


# ----------------------------------------------------------------------------------------------------
# The command line


def without_tables(out):
    """The output with the --show-probs tables taken out and the streamed pieces joined back together."""
    return "".join(line for line in out.splitlines(keepends=True) if not line.startswith("  "))


@pytest.mark.needs(*DAY2, "temperature_sampling", "top_k", "top_p")
def test_cli_show_probs_prints_tables_for_the_first_steps_and_the_same_text(checkpoint, capsys):  # noqa: F811
    argv = ["--checkpoint", str(checkpoint[0]), "--max-new-tokens", "8", "--seed", "3", "--top-k", "5"]
    code, plain, err = call_main(gen.main, argv, capsys)
    assert code == 0, err
    code, shown, err = call_main(gen.main, argv + ["--show-probs", "2"], capsys)
    assert code == 0, err
    for strategy in gen.STRATEGIES:
        assert shown.count(f"  step 1, {strategy}") == 1 and shown.count(f"  step 2, {strategy}") == 1
    assert "  step 3," not in shown
    assert "1 of " in shown and "5 of " in shown  # greedy keeps one token, top-k 5
    assert shown.count("    > ") == 2 * len(gen.STRATEGIES)  # the drawn token is marked once per table
    assert " cut" in shown
    assert without_tables(shown).replace("\n", "") == plain.replace("\n", "")  # showing does not change the draws
    code, default, _ = call_main(gen.main, argv + ["--strategy", "greedy", "--show-probs"], capsys)
    assert code == 0 and "  step 3, greedy" in default and "  step 4," not in default


def test_cli_show_probs_rejects_a_negative_count(checkpoint, capsys):  # noqa: F811
    code, _, err = call_main(gen.main, ["--checkpoint", str(checkpoint[0]), "--show-probs", "-1"], capsys)
    assert code != 0 and "--show-probs" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
