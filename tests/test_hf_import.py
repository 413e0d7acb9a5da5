"""Real weights, both ways, against Hugging Face's LlamaForCausalLM as the truth: small random checkpoints built
and saved by transformers (save_pretrained, beside the tiny tokenizer) are loaded with --hf-model DIR and
must give HF's logits, HF generate's greedy tokens and, with the same seed, generate(do_sample=True)'s
samples; our checkpoints exported with --export-hf must load in from_pretrained and pipeline and come back
unchanged. Everything runs offline on tiny configs."""

import json

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import llama
import llama_generation as gen
from extras import llama_commands, llama_hf
from helpers import call_main

DAY2 = ("rmsnorm", "swiglu", "causal_mask")  # the model's exercises, needed by every test that runs it
SAMPLING = ("temperature_sampling", "top_k", "top_p")

# Each differs from Meta's defaults in what a conversion can get wrong.
CONFIGS = {
    # multi-head, tied output, an FFN size that is no multiple of 64 (Meta's rounding would give 192)
    "mha_tied": dict(num_key_value_heads=4, tie_word_embeddings=True, intermediate_size=100,
                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    # grouped-query (k permuted with 2 heads, not 4), untied output, Llama 3's theta
    "gqa_untied_theta": dict(num_key_value_heads=2, tie_word_embeddings=False, intermediate_size=160,
                             rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
    # one k/v head, Llama 3.1's rope scaling with a short original context so the test's positions pass it
    "mqa_llama3_scaling": dict(num_key_value_heads=1, tie_word_embeddings=True, intermediate_size=88,
                               rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                "original_max_position_embeddings": 16}),
}


def hf_llama(tokenizer, seed=0, **overrides) -> LlamaForCausalLM:
    """A random LlamaForCausalLM with weights large enough that the argmax is never a near-tie."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=128, rms_norm_eps=1e-6, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, **overrides)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1)
            else:
                p.uniform_(0.5, 1.5)  # norm gains away from 1, so a missed one would show
    return model


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.fixture(scope="module", params=list(CONFIGS))
def hf_dir(request, tmp_path_factory, tokenizer):
    """(folder, the HF model in it): save_pretrained's files and the tokenizer's, as on the Hub."""
    model = hf_llama(tokenizer, **CONFIGS[request.param])
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path), model


def run(main, argv, capsys):
    return call_main(main, argv, capsys)


# ----------------------------------------------------------------------------------------------------
# Import


@pytest.mark.needs(*DAY2)
def test_imported_logits_equal_hf_llama_for_causal_lm(hf_dir):
    path, hf = hf_dir
    ours, _ = llama_hf.load_hf_model(path, "cpu")
    assert (ours.output.weight is ours.tok_embeddings.weight) == hf.config.tie_word_embeddings  # one matrix
    assert not any(p.is_meta for p in ours.parameters()) and not ours.freqs_cis.is_meta
    tokens = torch.randint(0, hf.config.vocab_size, (2, 100), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (ours(tokens) - hf(tokens).logits).abs().max().item()
    assert diff <= 1e-4


def test_model_args_read_every_detail_of_the_config(hf_dir):
    path, hf = hf_dir
    c = hf.config
    args = llama_hf.model_args_from_hf_config(llama_hf.read_hf_config(path))
    assert (args.n_kv_heads, args.hidden_dim, args.tie_embeddings, args.norm_eps, args.max_seq_len) == \
        (c.num_key_value_heads, c.intermediate_size, c.tie_word_embeddings, c.rms_norm_eps, 128)
    assert args.rope_theta == c.rope_parameters["rope_theta"]
    assert (args.rope_scaling is None) == (c.rope_parameters["rope_type"] == "default")
    assert llama_hf.model_args_from_hf_config(c, max_seq_len=40).max_seq_len == 40  # --max-seq-len caps it


def test_llama3_rotary_frequencies_equal_hf_rope_init():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(hidden_size=256, num_attention_heads=2, max_position_embeddings=1 << 17,
                         rope_parameters=CONFIGS["mqa_llama3_scaling"]["rope_parameters"]
                         | {"original_max_position_embeddings": 8192})
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    args = llama_hf.model_args_from_hf_config(config, max_seq_len=2)
    freqs = llama.precompute_freqs_cis(args.head_dim, 2, args.rope_theta, args.rope_scaling)[1].angle()
    torch.testing.assert_close(freqs, expected, rtol=1e-6, atol=0)  # position 1: the angle is the frequency
    assert not torch.allclose(expected, llama.precompute_freqs_cis(args.head_dim, 2, args.rope_theta)[1].angle())


def hf_continuation(hf, tokenizer, prompt, seed=None, **kwargs) -> str:
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    if seed is not None:
        torch.manual_seed(seed)
    new = hf.generate(ids, max_new_tokens=24, **kwargs)[0, ids.shape[1]:]
    return tokenizer.decode([t for t in new.tolist() if t != tokenizer.eos_token_id])


@pytest.mark.needs(*DAY2)
def test_greedy_decoding_equals_hf_generate(hf_dir, tokenizer):
    path, hf = hf_dir
    ours, _ = llama_hf.load_hf_model(path, "cpu")  # what --hf-model loads
    texts, _ = gen.generate(ours, tokenizer, "The city was", "cpu", 24, "greedy")
    assert texts[0] == hf_continuation(hf, tokenizer, "The city was", do_sample=False)


@pytest.mark.needs(*DAY2, *SAMPLING)
@pytest.mark.parametrize("strategy, seed", [("sample", 0), ("top_k", 7), ("top_p", 11)])
def test_seeded_sampling_equals_hf_generate_do_sample(hf_dir, tokenizer, strategy, seed):
    # HF draws with torch.multinomial(softmax(warped float32 logits), 1) from the global generator, after
    # temperature, top-k and top-p in that order; our sampler does the same from a generator seeded alike.
    path, hf = hf_dir
    ours, _ = llama_hf.load_hf_model(path, "cpu")
    texts, _ = gen.generate(ours, tokenizer, "The river", "cpu", 24, strategy, temperature=1.3, top_k=20,
                            top_p=0.8, seed=seed)
    expected = hf_continuation(hf, tokenizer, "The river", seed, do_sample=True, temperature=1.3,
                               top_k=20 if strategy == "top_k" else 0, top_p=0.8 if strategy == "top_p" else 1.0)
    assert texts[0] == expected


@pytest.mark.needs(*DAY2, *SAMPLING)
def test_cli_with_hf_model_streams_every_strategy_reproducibly(hf_dir, capsys):
    path, _ = hf_dir
    argv = ["--hf-model", path, "--prompt", "The river", "--max-new-tokens", "12", "--seed", "3"]
    code, out, err = run(gen.main, argv, capsys)
    assert code == 0, err
    for strategy in gen.STRATEGIES:
        assert f"=== {strategy} ===\nThe river" in out
    assert "parameters" in err and "float32" in err  # what was loaded, in which dtype, and why
    assert run(gen.main, argv, capsys)[1] == out


@pytest.mark.needs(*DAY2)
def test_generation_cli_caps_the_context_with_max_seq_len(hf_dir, capsys):
    path, _ = hf_dir
    code, out, err = run(gen.main, ["--hf-model", path, "--strategy", "greedy", "--prompt", "The",
                                    "--max-new-tokens", "50", "--max-seq-len", "12"], capsys)
    assert code == 0, err
    assert "[stopped: max_seq_len]" in out and "context 12" in err


def test_bos_ids_are_what_the_tokenizer_adds_itself(tokenizer):
    from tokenizers import processors

    assert llama_hf.bos_ids(tokenizer) == []  # GPT-2 style: nothing
    with_bos = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    bos = with_bos.convert_tokens_to_ids("<|endoftext|>")
    with_bos._tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)])
    assert with_bos("a")["input_ids"][0] == bos
    assert llama_hf.bos_ids(with_bos) == [bos]
    assert gen.encode_prompt(with_bos, "The city", 64)[0] == bos  # the prompt keeps the tokenizer's BOS


@pytest.mark.needs(*DAY2)
def test_eval_only_hf_model_perplexity_equals_hf_loss(hf_dir, tiny_wikitext_dir, tmp_path, capsys):
    path, hf = hf_dir
    code, out, err = run(llama.main, ["--eval-only", "--hf-model", path, "--data-dir", tiny_wikitext_dir,
                                      "--max-seq-len", "64", "--split", "validation",
                                      "--output-dir", str(tmp_path)], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "eval_validation.json").read_text())
    assert report["window"] == 64
    tok = AutoTokenizer.from_pretrained(path)
    text = (tmp_path / "v.txt")
    text.write_text(open(f"{tiny_wikitext_dir}/wiki.valid.raw").read())
    ids = torch.tensor(sum((tok(line, add_special_tokens=False)["input_ids"]
                            for line in text.read_text().splitlines(keepends=True)), []))
    # the truth: HF's own mean loss over the same windows of 64 predicted tokens, weighted by their length
    total = count = 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, 64):
            window = ids[start:start + 65][None]
            n = window.shape[1] - 1
            total += hf(window, labels=window).loss.item() * n
            count += n
    assert report["validation_loss"] == pytest.approx(total / count, rel=1e-4)


# ----------------------------------------------------------------------------------------------------
# Refusals: one line, exit 2


@pytest.fixture(scope="module")
def refused_dirs(tmp_path_factory):
    from transformers import MistralConfig

    dirs = {}
    dirs["mistral"] = tmp_path_factory.mktemp("mistral")
    MistralConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                  vocab_size=100).save_pretrained(dirs["mistral"])
    dirs["yarn"] = tmp_path_factory.mktemp("yarn")
    LlamaConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, vocab_size=100,
                rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                 "original_max_position_embeddings": 64}).save_pretrained(dirs["yarn"])
    return dirs


@pytest.mark.parametrize("kind, message", [("mistral", "only Llama-architecture"), ("yarn", "'yarn' is not implemented"),
                                           ("missing", "could not read the config")])
@pytest.mark.parametrize("script", ["generation", "eval"])
def test_unsupported_checkpoints_are_refused_in_one_line(refused_dirs, tmp_path, kind, message, script, capsys):
    path = str(refused_dirs.get(kind, tmp_path / "no-such-model"))
    if script == "generation":
        code, out, err = run(gen.main, ["--hf-model", path], capsys)
    else:
        code, out, err = run(llama.main, ["--eval-only", "--hf-model", path, "--data-dir", str(tmp_path)], capsys)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_hf_model_without_eval_only_says_what_to_add(hf_dir, capsys):
    code, out, err = run(llama.main, ["--hf-model", hf_dir[0]], capsys)
    assert code == 2 and "add --eval-only" in err and len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------------------------------
# Export


@pytest.fixture(scope="module", params=[(4, True), (2, False)], ids=["mha_tied", "gqa_untied"])
def exported(request, tmp_path_factory, tiny_tokenizer_dir):
    """A course checkpoint (as a training run saves it) exported with --export-hf."""
    n_kv_heads, tie = request.param
    torch.manual_seed(0)
    tok = llama.load_tokenizer(tiny_tokenizer_dir)
    model = llama.Transformer(llama.ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads,
                                              vocab_size=len(tok), max_seq_len=64, rope_theta=20000.0,
                                              tie_embeddings=tie)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.15) if p.dim() == 2 else p.uniform_(0.5, 1.5)
    root = tmp_path_factory.mktemp("export")
    llama_commands.save_checkpoint(root / "llama.pth", model, tiny_tokenizer_dir)
    code = llama.main(["--export-hf", str(root / "hf"), "--checkpoint", str(root / "llama.pth")])
    assert code == 0
    return str(root / "hf"), model


def test_export_writes_config_safetensors_and_tokenizer(exported):
    import os

    path, model = exported
    files = set(os.listdir(path))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
    assert not [f for f in files if f.startswith(".export-")]  # the temporary folder is gone
    config = json.loads(open(f"{path}/config.json").read())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] == \
        model.params.tie_embeddings


@pytest.mark.needs(*DAY2)
def test_exported_model_in_from_pretrained_gives_our_logits(exported):
    path, model = exported
    hf = LlamaForCausalLM.from_pretrained(path).eval()
    tokens = torch.randint(0, model.params.vocab_size, (2, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (hf(tokens).logits - model(tokens)).abs().max().item() <= 1e-4


def test_importing_an_export_gives_back_the_same_weights(exported):
    path, model = exported
    back, _ = llama_hf.load_hf_model(path, "cpu")
    assert back.params.tie_embeddings == model.params.tie_embeddings
    assert back.params.max_seq_len == model.params.max_seq_len and back.params.rope_theta == 20000.0
    original, imported = model.state_dict(), back.state_dict()
    assert original.keys() == imported.keys()
    for name in original:
        assert torch.equal(original[name], imported[name]), name


@pytest.mark.needs(*DAY2)
def test_pipeline_runs_an_export_and_continues_like_our_greedy_decoding(exported):
    from transformers import pipeline

    path, model = exported
    tok = AutoTokenizer.from_pretrained(path)
    out = pipeline("text-generation", model=path)("The city was", max_new_tokens=10, do_sample=False)
    ids = torch.tensor([tok("The city was")["input_ids"]])
    new, _ = gen.generate_tokens(model, ids, 10, gen.pick_greedy, tok.eos_token_id)
    ours = tok.decode([t for t in new[0].tolist() if t != tok.eos_token_id])
    assert out[0]["generated_text"] == "The city was" + ours


def test_export_of_a_missing_checkpoint_is_one_line(tmp_path, capsys):
    code, out, err = run(llama.main, ["--export-hf", str(tmp_path / "hf"), "--checkpoint",
                                      str(tmp_path / "none.pth")], capsys)
    assert code == 2 and "no checkpoint at" in err and len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------------------------------
# Instruct models: --chat


CHAT_TEMPLATE = ("{% for m in messages %}<|endoftext|>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def test_chat_prompt_is_the_tokenizers_template_with_the_generation_prompt(tokenizer):
    chat = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    chat.chat_template = CHAT_TEMPLATE
    expected = chat("<|endoftext|>user: The city\nassistant:", add_special_tokens=False)["input_ids"]
    assert gen.encode_prompt(chat, "The city", 64, chat=True) == expected
    assert gen.encode_prompt(chat, "The city", 64) == chat("The city")["input_ids"]


@pytest.mark.needs(*DAY2)
def test_cli_chat_uses_the_template_and_says_when_there_is_none(hf_dir, tokenizer, tmp_path, capsys):
    path, hf = hf_dir
    code, out, err = run(gen.main, ["--hf-model", path, "--chat", "--strategy", "greedy", "--max-new-tokens", "4"],
                         capsys)
    assert code == 0 and "no chat template; --chat is ignored" in err
    chat = AutoTokenizer.from_pretrained(path)
    chat.chat_template = CHAT_TEMPLATE
    chat.save_pretrained(tmp_path)
    ours, _ = llama_hf.load_hf_model(path, "cpu")
    texts, _ = gen.generate(ours, chat, "Hello", "cpu", 6, "greedy", chat=True)
    ids = torch.tensor([gen.encode_prompt(chat, "Hello", 64, chat=True)])
    new = hf.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1]:]
    assert texts[0] == chat.decode([t for t in new.tolist() if t != chat.eos_token_id])
    code, out, err = run(gen.main, ["--hf-model", path, "--tokenizer", str(tmp_path), "--chat", "--strategy",
                                    "greedy", "--max-new-tokens", "6", "--prompt", "Hello"], capsys)
    assert code == 0 and "chat template" not in err
