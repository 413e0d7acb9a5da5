"""extras/fast_decoding.py and tools/get_smollm2.py against independent truths.

FastDecoder's greedy tokens against the lesson's Transformer decoded by generate_tokens and against Hugging
Face's LlamaForCausalLM.generate, on small random models of several shapes, alone and in left-padded
batches; its logits against the lesson model's at every step, on every kernel choice; its choice of dtype
with the timings faked every way. get_smollm2's conversion against the model a tiny GGUF file was written
from. No timing is asserted.
"""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

import llama
import llama_generation as gen
import trainkit
from helpers import call_main
from hf_reference import to_hf_llama

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # extras/ and tools/ of this repository

from extras import fast_decoding as fd, llama_commands, llama_hf, step_kernels  # noqa: E402
from tools import get_smollm2  # noqa: E402

MEASURED_CHOICE = fd.choose_decoding  # the real one, before tests/conftest.py pins float32 on PyTorch
DAY2 = pytest.mark.needs("rmsnorm", "swiglu", "causal_mask")
C_BUILT, C_WHY = step_kernels.available()
# Each decoding test runs on both backends: PyTorch's operations and extras/step_kernels.c.
BACKENDS = ["torch", pytest.param("c", marks=pytest.mark.skipif(not C_BUILT, reason=f"no C kernels: {C_WHY}"))]

# What a fast path can get wrong: grouped-query heads, an untied output, a single key/value head.
SHAPES = {
    "mha_tied": dict(n_heads=4, n_kv_heads=4, tie_embeddings=True),
    "gqa_untied": dict(n_heads=4, n_kv_heads=2, tie_embeddings=False),
    "mqa_8_heads": dict(n_heads=8, n_kv_heads=1, tie_embeddings=True),
}


def tiny_model(seed=0, max_seq_len=48, vocab_size=101, **shape) -> llama.Transformer:
    torch.manual_seed(seed)
    model = llama.Transformer(llama.ModelArgs(dim=64, n_layers=3, vocab_size=vocab_size, multiple_of=32,
                                              max_seq_len=max_seq_len, **shape))
    with torch.no_grad():  # larger weights than the training init, so the argmax is never a near-tie
        for p in model.parameters():
            p.normal_(0, 0.15) if p.dim() == 2 else p.uniform_(0.5, 1.5)
    return model.eval()


PROMPT = torch.tensor([[5, 17, 42, 8, 99, 3]])
ROWS = [[5, 17, 42], [8, 99, 3, 61, 7, 12], [44]]


# ----------------------------------------------------------------------------------------------------
# The same tokens and logits as the lesson's model, and as Hugging Face's


@DAY2
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=list(SHAPES))
def test_greedy_tokens_equal_the_lesson_models_and_hf_generate(shape, backend):
    model = tiny_model(**SHAPES[shape])
    decoder = fd.FastDecoder(model, torch.float32, backend)
    ours, reason = gen.generate_tokens(decoder, PROMPT, 40, gen.pick_greedy)
    lesson, _ = gen.generate_tokens(model, PROMPT, 40, gen.pick_greedy)
    hf = to_hf_llama(model).generate(PROMPT, max_new_tokens=40, do_sample=False, eos_token_id=None,
                                     pad_token_id=0)
    assert reason == "max_new_tokens"
    assert ours.tolist() == lesson.tolist() == hf[:, PROMPT.shape[1]:].tolist()


@DAY2
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=list(SHAPES))
def test_left_padded_batch_equals_the_lesson_model_and_hf_generate_with_an_attention_mask(shape, backend):
    model = tiny_model(**SHAPES[shape])
    decoder = fd.FastDecoder(model, torch.float32, backend)
    tokens, n_pad = gen.pad_prompts(ROWS, pad_id=0)
    ours, _ = gen.generate_tokens(decoder, tokens, 30, gen.pick_greedy, n_pad=n_pad)
    lesson, _ = gen.generate_tokens(model, tokens, 30, gen.pick_greedy, n_pad=n_pad)
    attention_mask = (torch.arange(tokens.shape[1])[None, :] >= n_pad[:, None]).long()
    hf = to_hf_llama(model).generate(tokens, attention_mask=attention_mask, max_new_tokens=30, do_sample=False,
                                     eos_token_id=None, pad_token_id=0)
    assert ours.tolist() == lesson.tolist() == hf[:, tokens.shape[1]:].tolist()
    for row, new in zip(ROWS, ours):  # and each row as if alone
        alone, _ = gen.generate_tokens(decoder, torch.tensor([row]), 30, gen.pick_greedy)
        assert new.tolist() == alone[0].tolist()


KERNEL_CHOICES = [("torch", True, False), ("torch", True, True), ("torch", False, False), ("torch", False, True),
                  pytest.param("c", None, False, marks=BACKENDS[1].marks)]


@DAY2
@pytest.mark.parametrize("backend,onednn,transposed", KERNEL_CHOICES, ids=lambda v: str(v))
def test_every_step_gives_the_lesson_models_logits_on_every_kernel_choice(backend, onednn, transposed, monkeypatch):
    chosen = trainkit.kernels.RowKernels(onednn, transposed, {(onednn, transposed): 1.0})
    monkeypatch.setattr(trainkit.kernels, "fastest_row_kernels", lambda *args, **kwargs: chosen)
    model = tiny_model(**SHAPES["gqa_untied"])
    decoder = fd.FastDecoder(model, torch.float32, backend)
    tokens = torch.randint(0, 101, (2, 30), generator=torch.Generator().manual_seed(1))
    cache = llama.KVCache(model.params, 2)
    default = torch.backends.mkldnn.enabled
    with torch.no_grad():
        steps = [decoder(tokens[:, :5], 0, cache)] + [decoder(tokens[:, t:t + 1], t, cache) for t in range(5, 30)]
        whole = model(tokens)
    torch.testing.assert_close(torch.cat(steps, dim=1), whole, rtol=1e-5, atol=1e-5)
    assert (decoder.w_out_t is not None) == transposed
    assert torch.backends.mkldnn.enabled == default  # restored after every step


@DAY2
@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16_weights_give_logits_close_to_float32(backend):
    model = tiny_model(**SHAPES["gqa_untied"])
    tokens = torch.randint(0, 101, (1, 20), generator=torch.Generator().manual_seed(2))
    cache = llama.KVCache(model.params, 1)
    decoder = fd.FastDecoder(model, torch.bfloat16, backend)
    assert decoder.layers[0].wqkv.dtype == decoder.w_out.dtype == torch.bfloat16
    with torch.no_grad():
        steps = [decoder(tokens[:, :4], 0, cache)] + [decoder(tokens[:, t:t + 1], t, cache) for t in range(4, 20)]
        whole = model(tokens)
    torch.testing.assert_close(torch.cat(steps, dim=1).float(), whole, rtol=0.05, atol=0.1)


@DAY2
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_bfloat16_model_decodes_in_float32_weights_with_its_bfloat16_cache(backend):
    model = tiny_model(**SHAPES["mqa_8_heads"])
    fp32, _ = gen.generate_tokens(model, PROMPT, 10, gen.pick_greedy)
    model = model.to(torch.bfloat16)
    ours, _ = gen.generate_tokens(fd.FastDecoder(model, torch.float32, backend), PROMPT, 10, gen.pick_greedy)
    lesson, _ = gen.generate_tokens(model, PROMPT, 10, gen.pick_greedy)
    assert ours[0, :3].tolist() == lesson[0, :3].tolist() == fp32[0, :3].tolist()


@DAY2
@pytest.mark.parametrize("backend", BACKENDS)
def test_stops_at_eos_and_max_seq_len_like_the_lesson_model(backend):
    model = tiny_model(max_seq_len=16, **SHAPES["mha_tied"])
    decoder = fd.FastDecoder(model, torch.float32, backend)
    lesson, _ = gen.generate_tokens(model, PROMPT, 50, gen.pick_greedy)
    eos = int(lesson[0, 4])
    for runs in (decoder, model):
        new, reason = gen.generate_tokens(runs, PROMPT, 50, gen.pick_greedy, eos_id=eos)
        assert reason == "eos" and new[0, -1] == eos
        new, reason = gen.generate_tokens(runs, PROMPT, 50, gen.pick_greedy)
        assert reason == "max_seq_len" and new.shape == (1, 10)


@DAY2
def test_without_a_cache_or_with_a_prompt_the_decoder_runs_the_lesson_model():
    model = tiny_model(**SHAPES["mha_tied"])
    decoder = fd.FastDecoder(model, torch.float32)
    assert decoder.params is model.params and decoder.output is model.output and decoder.eval() is decoder
    with torch.no_grad():
        assert torch.equal(decoder(PROMPT), model(PROMPT))
    with pytest.raises(ValueError, match="max_seq_len"):
        decoder(PROMPT[:, :1], 48, llama.KVCache(model.params, 1))


# ----------------------------------------------------------------------------------------------------
# Built once per model; the dtype measured


def test_fast_decoder_is_built_once_and_again_after_the_weights_change(monkeypatch):
    monkeypatch.setattr(fd, "_DECODERS", fd.weakref.WeakKeyDictionary())
    model = tiny_model(**SHAPES["mha_tied"])
    first = fd.fast_decoder(model, torch.float32)
    assert fd.fast_decoder(model) is first
    with torch.no_grad():
        model.layers[1].feed_forward.w2.weight.mul_(2)  # what an optimizer step does to it
    again = fd.fast_decoder(model)
    assert again is not first and torch.equal(again.layers[1].w2, model.layers[1].feed_forward.w2.weight)
    assert fd.fast_decoder(model, torch.bfloat16).dtype == torch.bfloat16


F32, BF16 = torch.float32, torch.bfloat16


@pytest.mark.parametrize("ms,expected,expected_in_float32", [
    ({(F32, "torch"): 30.0, (F32, "c"): 25.0, (BF16, "torch"): 28.0, (BF16, "c"): 15.0}, (BF16, "c"), (F32, "c")),
    ({(F32, "torch"): 30.0, (F32, "c"): 20.0, (BF16, "torch"): 18.0, (BF16, "c"): 21.0}, (BF16, "torch"), (F32, "c")),
    ({(F32, "torch"): 30.0, (F32, "c"): 28.0, (BF16, "torch"): 29.0, (BF16, "c"): 31.0}, (F32, "torch"), (F32, "torch")),
    ({(F32, "torch"): 20.0, (F32, "c"): 26.0, (BF16, "torch"): 26.0, (BF16, "c"): 40.0}, (F32, "torch"), (F32, "torch")),
], ids=["bf16_c_clearly_faster", "bf16_torch_fastest", "all_within_the_margin", "fp32_torch_fastest"])
def test_the_dtype_and_backend_are_the_pair_a_measured_step_says_is_fastest(ms, expected, expected_in_float32,
                                                                           monkeypatch):
    monkeypatch.setattr(fd, "choose_decoding", MEASURED_CHOICE)  # tests/conftest.py pins float32 elsewhere
    monkeypatch.setattr(fd, "usable_backends", lambda model: ("torch", "c"))
    monkeypatch.setattr(fd, "time_candidates", lambda model, candidates: {c: ms[c] / 1e3 for c in candidates})
    model = tiny_model(**SHAPES["mha_tied"])
    (dtype, backend), why = fd.choose_decoding(model)
    assert (dtype, backend) == expected
    assert all(f"{t:.1f} ms on {fd.candidate_name(c)}" in why for c, t in ms.items())
    # with the dtype given, only the candidates in that dtype are compared
    assert fd.choose_decoding(model, dtype=F32)[0] == expected_in_float32


@pytest.mark.skipif(not C_BUILT, reason=f"no C kernels: {C_WHY}")
def test_the_decoder_built_on_the_choice_says_what_it_chose(monkeypatch):
    monkeypatch.setattr(fd, "choose_decoding", MEASURED_CHOICE)
    monkeypatch.setattr(fd, "time_candidates", lambda model, candidates: {c: 0.01 if c == (BF16, "c") else 0.03
                                                                          for c in candidates})
    decoder = fd.FastDecoder(tiny_model(**SHAPES["mha_tied"]))
    assert (decoder.dtype, decoder.backend) == (BF16, "c") and decoder.layers[0].w13.dtype == BF16
    assert decoder.describe().startswith("fast decoding: bfloat16 weights on extras/step_kernels.c (a step measured")


def test_without_the_c_kernels_pytorch_is_the_only_choice_and_asking_for_them_is_refused(monkeypatch):
    monkeypatch.setattr(fd, "kernels_available", lambda: (False, "no C compiler found (set CC to one)"))
    monkeypatch.setattr(fd, "choose_decoding", MEASURED_CHOICE)
    model = tiny_model(**SHAPES["mha_tied"])
    assert fd.usable_backends(model) == ("torch",)
    with pytest.raises(ValueError, match="no C compiler"):
        fd.FastDecoder(model, torch.float32, "c")
    assert fd.choose_decoding(model, dtype=F32) == ((F32, "torch"), "the only choice here; extras/step_kernels.c: "
                                                                  "no C compiler found (set CC to one)")


@DAY2
def test_step_timing_runs_real_steps_and_leaves_the_kernel_setting_alone():
    default = torch.backends.mkldnn.enabled
    model = tiny_model(**SHAPES["gqa_untied"])
    candidates = [(d, b) for d in (F32, BF16) for b in fd.usable_backends(model)]
    seconds = fd.time_candidates(model, candidates, rounds=1)
    assert set(seconds) == set(candidates) and all(s > 0 for s in seconds.values())
    assert torch.backends.mkldnn.enabled == default


# ----------------------------------------------------------------------------------------------------
# tools/get_smollm2.py


def test_get_smollm2_says_what_to_install_in_one_line_when_a_package_is_missing(monkeypatch, capsys):
    monkeypatch.setattr(get_smollm2.importlib.util, "find_spec", lambda name: None)
    assert get_smollm2.main(["unused"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install -r requirements-extras.txt" in err


def hf_llama(vocab_size=96, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **overrides)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.15)
    return model


def test_plain_llama_drops_the_quantization_config_and_keeps_every_weight(tmp_path):
    from transformers import LlamaForCausalLM

    loaded = hf_llama(tie_word_embeddings=True)
    loaded.config.quantization_config = {"quant_method": "gguf"}  # what a GGUF load may leave behind
    plain = get_smollm2.plain_llama(loaded)
    plain.save_pretrained(tmp_path)
    again = LlamaForCausalLM.from_pretrained(tmp_path)
    assert not hasattr(again.config, "quantization_config")
    tokens = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        torch.testing.assert_close(again(tokens).logits, loaded(tokens).logits)


def write_gguf(path: Path, model, tokenizer) -> None:
    """The model as llama.cpp's converter writes a Llama: GGUF names, q and k rows in Meta's interleaved
    order, float32 tensors, the byte-level BPE vocabulary and merges."""
    import gguf

    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([gguf.TokenType.CONTROL if t in tokenizer.all_special_tokens else gguf.TokenType.NORMAL
                       for t, _ in vocab])
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    w.add_eos_token_id(tokenizer.eos_token_id)
    w.add_bos_token_id(tokenizer.eos_token_id)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    per_layer = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied: no output.weight in the file
        if name.startswith("model.layers."):
            i, rest = name.removeprefix("model.layers.").split(".", 1)
            module = rest.removesuffix(".weight")
            if module == "self_attn.q_proj":
                tensor = llama_hf.hf_to_meta_rotary(tensor, c.num_attention_heads)
            elif module == "self_attn.k_proj":
                tensor = llama_hf.hf_to_meta_rotary(tensor, c.num_key_value_heads)
            names[name] = f"blk.{i}.{per_layer[module]}.weight"
        w.add_tensor(names[name], tensor.float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.skipif(importlib.util.find_spec("gguf") is None or importlib.util.find_spec("accelerate") is None,
                    reason="the extras (pip install -r requirements-extras.txt) are not installed")
def test_a_tiny_gguf_file_converts_to_the_model_it_was_written_from(tiny_tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    original = hf_llama(vocab_size=len(tokenizer), tie_word_embeddings=True)
    write_gguf(tmp_path / "tiny.gguf", original, tokenizer)
    get_smollm2.convert(tmp_path / "tiny.gguf", tmp_path / "out")
    converted = LlamaForCausalLM.from_pretrained(tmp_path / "out")
    text = "The cat was built in 1900 ."
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    assert AutoTokenizer.from_pretrained(tmp_path / "out")(text)["input_ids"] == ids[0].tolist()
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, original(ids).logits, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# The command line decodes through it; a chat's answer stands apart and ends at the end of the turn

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory, tiny_tokenizer_dir):
    """A tiny checkpoint whose tokenizer has ChatML's special tokens and chat template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    folder = tmp_path_factory.mktemp("chat_tokenizer")
    tok.save_pretrained(folder)
    model = tiny_model(vocab_size=len(tok), max_seq_len=64, **SHAPES["gqa_untied"])
    path = folder / "llama.pth"
    llama_commands.save_checkpoint(path, model, str(folder))
    return path, tok


def test_end_of_turn_is_the_special_token_the_chat_template_closes_a_message_with(chat_checkpoint):
    _, tok = chat_checkpoint
    assert llama_hf.end_of_turn_id(tok) == tok.convert_tokens_to_ids("<|im_end|>") != tok.eos_token_id


@DAY2
def test_chat_prints_the_answer_apart_and_stops_at_the_end_of_turn_without_printing_it(chat_checkpoint,
                                                                                      monkeypatch, capsys):
    path, tok = chat_checkpoint
    script = tok(" Paris.", add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")] * 9
    steps = iter(script)
    monkeypatch.setattr(gen, "pick_greedy", lambda logits: torch.full((logits.shape[0], 1), next(steps)))
    code, out, err = call_main(gen.main, ["--checkpoint", str(path), "--strategy", "greedy", "--chat",
                                          "--prompt", "Capital of France?", "--max-new-tokens", "8"], capsys)
    assert code == 0, err
    assert "=== greedy ===\nCapital of France?\n Paris.\n[stopped: eos]" in out and "<|im_" not in out
    assert err.startswith("fast decoding: ")  # the dtype chosen and why, then the kernels
    assert "decoding kernels: " in err
