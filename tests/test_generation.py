"""Generation tests: the filters against Hugging Face's logits warpers, greedy decoding against
LlamaForCausalLM.generate, the KV cache against recomputing the whole sequence, and the command line."""

import pytest
import torch
from transformers.generation.logits_process import TopPLogitsWarper

import grading
import llama
import llama_generation as gen
from extras import llama_commands
from helpers import call_main
from hf_reference import to_hf_llama

DAY2 = ("rmsnorm", "swiglu", "causal_mask")  # the model's exercises, needed by every test that runs it


def random_logits(batch=4, vocab=200, scale=3.0, seed=0):
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def kept(logits):
    return torch.isfinite(logits)


# ----------------------------------------------------------------------------------------------------
# The filters


# The exercises' graded tests: the checks live in tests/grading.py (shared with the battery of correct and
# wrong solutions in tests/test_grading.py) and say what is wrong in the exercise's terms. The reference
# solution's own choices where correct solutions differ (all tied tokens kept, k above the vocabulary size,
# the input left as it is) are tested, ungraded, in tests/test_reference_choices.py.


@pytest.mark.top_k
def test_filter_top_k_matches_hf_top_k_logits_warper():
    grading.check_top_k(gen.filter_top_k)


@pytest.mark.top_k
def test_filter_top_k_with_ties_matches_hf():
    grading.check_top_k_with_ties(gen.filter_top_k)


@pytest.mark.top_p
def test_filter_top_p_matches_hf_top_p_logits_warper():
    grading.check_top_p(gen.filter_top_p)


@pytest.mark.top_p
def test_filter_top_p_with_ties_matches_hf_up_to_which_tied_tokens_are_kept():
    grading.check_top_p_with_ties(gen.filter_top_p)


# ----------------------------------------------------------------------------------------------------
# Sampling


@pytest.mark.temperature_sampling
def test_sampling_frequencies_follow_softmax_of_logits_over_temperature():
    grading.check_sampling_frequencies(gen.sample_with_temperature)


@pytest.mark.temperature_sampling
def test_seeded_sampling_is_reproducible_and_seeds_differ():
    grading.check_sampling_seeded(gen.sample_with_temperature)


@pytest.mark.needs("temperature_sampling", "top_k")
def test_top_k_samples_always_lie_in_the_top_k_set():
    logits = random_logits(batch=512, vocab=50, scale=0.5)
    draws = gen.Sampler("top_k", temperature=1.5, top_k=5, generator=torch.Generator().manual_seed(0))(logits)
    top5 = torch.topk(logits, 5).indices
    assert bool((draws == top5).any(-1).all())


@pytest.mark.needs("temperature_sampling", "top_p")
def test_top_p_samples_always_lie_in_the_nucleus():
    logits = random_logits(batch=512, vocab=50, scale=2.0)
    draws = gen.Sampler("top_p", temperature=1.0, top_p=0.5, generator=torch.Generator().manual_seed(0))(logits)
    nucleus = kept(TopPLogitsWarper(top_p=0.5)(None, logits.clone()))
    assert bool(nucleus.gather(1, draws).all())


@pytest.mark.parametrize("kwargs, message", [
    (dict(strategy="sample", temperature=0.0), "--temperature"),
    (dict(strategy="top_k", top_k=0), "--top-k"),
    (dict(strategy="top_p", top_p=0.0), "--top-p"),
    (dict(strategy="top_p", top_p=1.5), "--top-p"),
    (dict(strategy="beam"), "unknown strategy"),
])
def test_sampler_rejects_invalid_settings(kwargs, message):
    with pytest.raises(llama.UserError, match=message):
        gen.Sampler(**kwargs)


# ----------------------------------------------------------------------------------------------------
# Decoding with the model


def tiny_model(n_kv_heads=None, max_seq_len=48, vocab_size=101, seed=0):
    torch.manual_seed(seed)
    model = llama.Transformer(llama.ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads,
                                              vocab_size=vocab_size, multiple_of=32, max_seq_len=max_seq_len))
    with torch.no_grad():  # larger weights than the training init, so the argmax is never a near-tie
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
    return model.eval()


@pytest.mark.needs(*DAY2)
@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_greedy_generation_equals_hf_generate(n_kv_heads):
    model = tiny_model(n_kv_heads)
    hf = to_hf_llama(model)
    prompt = torch.tensor([[5, 17, 42, 8, 99, 3]])
    ours, reason = gen.generate_tokens(model, prompt, 30, gen.pick_greedy)
    theirs = hf.generate(prompt, max_new_tokens=30, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert reason == "max_new_tokens"
    assert ours.tolist() == theirs[:, prompt.shape[1]:].tolist()


@pytest.mark.needs(*DAY2)
@pytest.mark.parametrize("n_kv_heads", [4, 1])
def test_cached_decoding_gives_the_logits_of_recomputing_the_whole_sequence(n_kv_heads):
    model = tiny_model(n_kv_heads)
    tokens = torch.randint(0, 101, (3, 40), generator=torch.Generator().manual_seed(0))
    cache = llama.KVCache(model.params, 3)
    with torch.no_grad():
        # prefill in two chunks (the second has start_pos > 0 and needs the offset mask), then one by one
        step_logits = [model(tokens[:, :5], 0, cache), model(tokens[:, 5:12], 5, cache)]
        step_logits += [model(tokens[:, t:t + 1], t, cache) for t in range(12, 40)]
        full = model(tokens)
    torch.testing.assert_close(torch.cat(step_logits, dim=1), full, rtol=1e-4, atol=1e-4)


@pytest.mark.needs(*DAY2)
@pytest.mark.parametrize("use_cache", [True, False])
def test_prompts_of_different_lengths_batched_give_what_each_gives_alone(use_cache):
    model = tiny_model(1)
    rows = [[5, 17, 42], [8, 99, 3, 61, 7, 12, 30], [44]]
    tokens, n_pad = gen.pad_prompts(rows, pad_id=0)
    assert n_pad.tolist() == [4, 0, 6] and tokens[0].tolist() == [0, 0, 0, 0, 5, 17, 42]
    batched, _ = gen.generate_tokens(model, tokens, 20, gen.pick_greedy, use_cache=use_cache, n_pad=n_pad)
    for row, new in zip(rows, batched):
        alone, _ = gen.generate_tokens(model, torch.tensor([row]), 20, gen.pick_greedy)
        assert new.tolist() == alone[0].tolist()
    with torch.no_grad():  # the scores themselves, not only the argmax: last position of the prefill
        cache = llama.KVCache(model.params, 3)
        cache.pad_left(n_pad)
        last = model(tokens, 0, cache)[:, -1]
        for i, row in enumerate(rows):
            torch.testing.assert_close(last[i], model(torch.tensor([row]))[0, -1], rtol=1e-4, atol=1e-4)


@pytest.mark.needs(*DAY2)
def test_left_padded_batch_equals_hf_generate_with_an_attention_mask():
    model = tiny_model(2)
    hf = to_hf_llama(model)
    tokens, n_pad = gen.pad_prompts([[5, 17, 42], [8, 99, 3, 61, 7]], pad_id=0)
    ours, _ = gen.generate_tokens(model, tokens, 25, gen.pick_greedy, n_pad=n_pad)
    attention_mask = (torch.arange(tokens.shape[1])[None, :] >= n_pad[:, None]).long()
    theirs = hf.generate(tokens, attention_mask=attention_mask, max_new_tokens=25, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    assert ours.tolist() == theirs[:, tokens.shape[1]:].tolist()


def test_pad_prompts_needs_no_mask_for_equal_lengths():
    tokens, n_pad = gen.pad_prompts([[1, 2], [3, 4]], pad_id=0)
    assert tokens.tolist() == [[1, 2], [3, 4]] and n_pad is None


@pytest.mark.needs(*DAY2)
def test_generation_without_cache_picks_the_same_tokens():
    model = tiny_model()
    prompt = torch.tensor([[1, 2, 3], [4, 5, 6]])
    with_cache, _ = gen.generate_tokens(model, prompt, 25, gen.pick_greedy, use_cache=True)
    without, _ = gen.generate_tokens(model, prompt, 25, gen.pick_greedy, use_cache=False)
    assert torch.equal(with_cache, without)


@pytest.mark.needs(*DAY2)
def test_generation_stops_at_eos_and_at_max_seq_len_and_says_which():
    model = tiny_model(max_seq_len=16)
    calls = {"n": 0}

    def eos_on_third(logits):
        calls["n"] += 1
        return torch.full((logits.shape[0], 1), 7 if calls["n"] == 3 else 1)

    new, reason = gen.generate_tokens(model, torch.tensor([[1, 2]]), 10, eos_on_third, eos_id=7)
    assert reason == "eos" and new.tolist() == [[1, 1, 7]]
    new, reason = gen.generate_tokens(model, torch.tensor([[1, 2, 3, 4]]), 50, gen.pick_greedy)
    assert reason == "max_seq_len" and new.shape == (1, 12)


# ----------------------------------------------------------------------------------------------------
# The command line, in process


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_tokenizer_dir):
    tok = llama.load_tokenizer(tiny_tokenizer_dir)
    model = tiny_model(vocab_size=len(tok), max_seq_len=64)
    path = tmp_path_factory.mktemp("ckpt") / "llama.pth"
    llama_commands.save_checkpoint(path, model, tiny_tokenizer_dir)
    return path, model


# ----------------------------------------------------------------------------------------------------
# The course's four entry points: each follows every one of its arguments


@pytest.fixture(scope="module")
def entry_args(checkpoint, tiny_tokenizer_dir):
    """(model, tokenizer, prompt, device, max_length) for generate_text_*."""
    return checkpoint[1], llama.load_tokenizer(tiny_tokenizer_dir), "The river", "cpu", 20


@pytest.mark.needs(*DAY2)
def test_generate_text_greedy_stops_at_max_length_and_is_the_same_at_every_temperature(entry_args):
    text = gen.generate_text_greedy(*entry_args)
    shorter = gen.generate_text_greedy(*entry_args[:4], max_length=5)
    assert text.startswith(shorter) and len(shorter) < len(text)
    # argmax(logits / T) = argmax(logits): the documented reason greedy's temperature changes nothing
    assert gen.generate_text_greedy(*entry_args, temperature=0.3) == gen.generate_text_greedy(*entry_args, 3.0) == text


@pytest.mark.needs(*DAY2, "temperature_sampling")
def test_generate_text_sampling_follows_its_seed_temperature_and_max_length(entry_args):
    text = gen.generate_text_sampling(*entry_args, temperature=1.0, seed=1)
    assert gen.generate_text_sampling(*entry_args, temperature=1.0, seed=1) == text
    assert gen.generate_text_sampling(*entry_args, temperature=1.0, seed=2) != text
    assert gen.generate_text_sampling(*entry_args, temperature=3.0, seed=1) != text
    assert gen.generate_text_sampling(*entry_args, temperature=1e-3, seed=1) == gen.generate_text_greedy(*entry_args)
    shorter = gen.generate_text_sampling(*entry_args[:4], max_length=5, temperature=1.0, seed=1)
    assert text.startswith(shorter) and len(shorter) < len(text)  # the same first draws, fewer of them


@pytest.mark.needs(*DAY2, "temperature_sampling", "top_k")
def test_generate_text_topk_follows_k_seed_and_temperature(entry_args):
    greedy = gen.generate_text_greedy(*entry_args)
    assert gen.generate_text_topk(*entry_args, temperature=2.0, top_k=1, seed=1) == greedy  # only the top token
    text = gen.generate_text_topk(*entry_args, temperature=1.0, top_k=50, seed=1)
    assert text != greedy
    assert gen.generate_text_topk(*entry_args, temperature=1.0, top_k=50, seed=1) == text
    assert gen.generate_text_topk(*entry_args, temperature=1.0, top_k=50, seed=2) != text
    assert gen.generate_text_topk(*entry_args, temperature=3.0, top_k=50, seed=1) != text
    everything = entry_args[0].params.vocab_size  # nothing filtered: plain sampling, draw for draw
    assert gen.generate_text_topk(*entry_args, temperature=1.3, top_k=everything, seed=1) == \
        gen.generate_text_sampling(*entry_args, temperature=1.3, seed=1)


@pytest.mark.needs(*DAY2, "temperature_sampling", "top_p")
def test_generate_text_topp_follows_p_seed_and_temperature(entry_args):
    greedy = gen.generate_text_greedy(*entry_args)
    assert gen.generate_text_topp(*entry_args, temperature=2.0, top_p=1e-6, seed=1) == greedy  # the top token alone
    text = gen.generate_text_topp(*entry_args, temperature=1.0, top_p=0.9, seed=1)
    assert text != greedy
    assert gen.generate_text_topp(*entry_args, temperature=1.0, top_p=0.9, seed=1) == text
    assert gen.generate_text_topp(*entry_args, temperature=1.0, top_p=0.9, seed=2) != text
    assert gen.generate_text_topp(*entry_args, temperature=3.0, top_p=0.9, seed=1) != text
    assert gen.generate_text_topp(*entry_args, temperature=1.0, top_p=0.3, seed=1) != text
    assert gen.generate_text_topp(*entry_args, temperature=1.3, top_p=1.0, seed=1) == \
        gen.generate_text_sampling(*entry_args, temperature=1.3, seed=1)  # p = 1 keeps everything


def run_main(argv, capsys):
    return call_main(gen.main, argv, capsys)


@pytest.mark.needs(*DAY2, "temperature_sampling", "top_k", "top_p")
def test_cli_prints_all_four_strategies_reproducibly(checkpoint, capsys):
    argv = ["--checkpoint", str(checkpoint[0]), "--max-new-tokens", "12", "--seed", "3"]
    code, out, err = run_main(argv, capsys)
    assert code == 0, err
    for strategy in gen.STRATEGIES:
        assert f"=== {strategy} ===\nIn a world where" in out
    assert out.count("[stopped: max_new_tokens]") == 4
    assert run_main(argv, capsys)[1] == out  # same seed, same text
    assert run_main(argv[:-1] + ["4"], capsys)[1] != out


@pytest.mark.needs(*DAY2)
def test_cli_streamed_text_equals_the_greedy_continuation(checkpoint, tiny_tokenizer_dir, capsys):
    path, model = checkpoint
    tok = llama.load_tokenizer(tiny_tokenizer_dir)
    expected = gen.generate_text_greedy(model, tok, "The river", "cpu", max_length=10)
    code, out, _ = run_main(["--checkpoint", str(path), "--strategy", "greedy", "--prompt", "The river",
                             "--max-new-tokens", "10"], capsys)
    assert code == 0 and out.splitlines()[1] == "The river" + expected.replace("\n", "")


@pytest.mark.needs(*DAY2)
def test_cli_decodes_several_prompts_as_one_batch_each_as_if_alone(checkpoint, tiny_tokenizer_dir, capsys):
    path, model = checkpoint
    tok = llama.load_tokenizer(tiny_tokenizer_dir)
    prompts = ["The river", "A long and winding road goes on and"]
    code, out, err = run_main(["--checkpoint", str(path), "--strategy", "greedy", "--max-new-tokens", "10",
                               "--prompt", *prompts], capsys)
    assert code == 0, err
    second = out.split("--- sample 1 of prompt 2 ---\n")[1].split("\n[stopped:")[0]
    assert second == prompts[1] + gen.generate_text_greedy(model, tok, prompts[1], "cpu", max_length=10)
    assert out.splitlines()[1] == prompts[0] + gen.generate_text_greedy(model, tok, prompts[0], "cpu",
                                                                        max_length=10).replace("\n", "")


@pytest.mark.needs(*DAY2)
def test_bare_state_dict_loads_with_model_flags(checkpoint, tmp_path, capsys):
    path, model = checkpoint
    bare = tmp_path / "bare.pth"
    torch.save(model.state_dict(), bare)
    code, _, err = run_main(["--checkpoint", str(bare), "--strategy", "greedy"], capsys)
    assert code == 2 and "--n-heads" in err
    code, out, err = run_main(["--checkpoint", str(bare), "--tokenizer", torch.load(path)["tokenizer"],
                               "--n-heads", "4", "--max-seq-len", "64", "--multiple-of", "32",
                               "--strategy", "greedy", "--max-new-tokens", "5"], capsys)
    assert code == 0, err
    assert out == run_main(["--checkpoint", str(path), "--strategy", "greedy", "--max-new-tokens", "5"], capsys)[1]


@pytest.mark.needs(*DAY2)
def test_empty_and_overlong_prompts_have_documented_behaviour(checkpoint, capsys):
    path, _ = checkpoint
    code, out, err = run_main(["--checkpoint", str(path), "--strategy", "greedy", "--prompt", "",
                               "--max-new-tokens", "4"], capsys)
    assert code == 0 and "[stopped:" in out  # starts from the end-of-text token
    code, out, err = run_main(["--checkpoint", str(path), "--strategy", "greedy", "--prompt", "the cat " * 80,
                               "--max-new-tokens", "4"], capsys)
    assert code == 0 and "keeping its last 63" in err and "[stopped: max_seq_len]" in out


@pytest.mark.parametrize("extra, message", [
    (["--temperature", "0", "--strategy", "sample"], "--temperature"),
    (["--top-k", "0"], "--top-k"),
    (["--top-p", "1.5"], "--top-p"),
    (["--top-p", "0"], "--top-p"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
])
def test_invalid_flags_end_with_one_clear_line(checkpoint, extra, message, capsys):
    code, out, err = run_main(["--checkpoint", str(checkpoint[0]), *extra], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err and out == ""


def test_bad_checkpoints_and_tokenizers_are_reported(checkpoint, tmp_path, capsys):
    code, _, err = run_main(["--checkpoint", str(tmp_path / "none.pth")], capsys)
    assert code == 2 and "python llama.py" in err
    (tmp_path / "junk.pth").write_text("hello")
    code, _, err = run_main(["--checkpoint", str(tmp_path / "junk.pth")], capsys)
    assert code == 2 and "not a readable PyTorch checkpoint" in err
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pth")
    code, _, err = run_main(["--checkpoint", str(tmp_path / "other.pth")], capsys)
    assert code == 2 and "neither a llama.py checkpoint" in err
    small = tiny_model(vocab_size=50)
    llama_commands.save_checkpoint(tmp_path / "small.pth", small, torch.load(checkpoint[0])["tokenizer"])
    code, _, err = run_main(["--checkpoint", str(tmp_path / "small.pth")], capsys)
    assert code == 2 and "tokenizer has" in err
    for e in (err,):
        assert "Traceback" not in e


@pytest.mark.needs("temperature_sampling")
def test_sampler_never_passes_filter_top_k_a_k_above_the_vocabulary(monkeypatch):
    # A correct filter_top_k may call torch.topk(logits, k) without clamping k; the Sampler clamps it first.
    def top_k_unclamped(logits, k):
        assert k <= logits.size(-1), f"k={k} for a vocabulary of {logits.size(-1)}"
        return logits.masked_fill(logits < torch.topk(logits, k).values[:, -1:], float("-inf"))

    monkeypatch.setattr(gen, "filter_top_k", top_k_unclamped)
    draws = gen.Sampler("top_k", top_k=500, generator=torch.Generator().manual_seed(0))(random_logits(vocab=50))
    assert draws.shape == (4, 1)
