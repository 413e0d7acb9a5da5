"""Day 2 tests: each piece of llama.py against an independent implementation.

RMSNorm against torch.nn.RMSNorm, FeedForward against Hugging Face's LlamaMLP, the causal mask against
torch.tril and SDPA's own is_causal, the whole Transformer against Hugging Face's LlamaForCausalLM with
the weights copied across; then the data pipeline, training and the command line.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F

import grading
import llama
from helpers import call_main
from extras import llama_commands
from hf_reference import to_hf_llama
from llama import ModelArgs, Transformer

# Whole-model tests: green once all three Day 2 exercises are done.
NEEDS_DAY2 = pytest.mark.needs("rmsnorm", "swiglu", "causal_mask")


def tiny_args(**overrides) -> ModelArgs:
    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=None, vocab_size=101, multiple_of=32, max_seq_len=32)
    return ModelArgs(**{**base, **overrides})


# ----------------------------------------------------------------------------------------------------
# Components


# The exercises' graded tests: the checks live in tests/grading.py (shared with the battery of correct and
# wrong solutions in tests/test_grading.py) and say what is wrong in the exercise's terms.


@pytest.mark.rmsnorm
def test_rmsnorm_matches_torch_nn_rmsnorm():
    grading.check_rmsnorm(llama.RMSNorm)


@pytest.mark.rmsnorm
def test_rmsnorm_keeps_bf16_inputs_in_bf16():
    grading.check_rmsnorm_bf16(llama.RMSNorm)


@pytest.mark.swiglu
def test_feedforward_matches_hf_llama_mlp():
    grading.check_swiglu(llama.FeedForward)


def test_hidden_dim_follows_metas_rounding():
    # 2/3 of 4*dim, times the multiplier, rounded up to multiple_of: LLaMA-7B's 4096 -> 11008.
    assert ModelArgs(dim=4096, n_heads=32, multiple_of=256).hidden_dim == 11008
    assert ModelArgs(dim=8192, n_heads=64, multiple_of=4096, ffn_dim_multiplier=1.3).hidden_dim == 28672


@pytest.mark.causal_mask
def test_causal_mask_is_the_lower_triangle_offset_by_start_pos():
    grading.check_causal_mask(llama.causal_mask)


@pytest.mark.causal_mask
def test_causal_mask_in_attention_equals_sdpa_is_causal():
    grading.check_causal_mask_in_attention(llama.causal_mask)


@pytest.mark.causal_mask
def test_causal_mask_is_made_on_the_device_asked_for():
    grading.check_causal_mask_device(llama.causal_mask)


def test_rotary_embedding_keeps_norms_and_depends_only_on_relative_position():
    torch.manual_seed(0)
    freqs = llama.precompute_freqs_cis(16, 40)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(m, n):
        qm, _ = llama.apply_rotary_emb(q, q, freqs[m:m + 1])
        _, kn = llama.apply_rotary_emb(k, k, freqs[n:n + 1])
        return (qm * kn).sum()

    rq, _ = llama.apply_rotary_emb(q, k, freqs[9:10])
    torch.testing.assert_close(rq.norm(), q.norm())
    torch.testing.assert_close(score(3, 1), score(30, 28), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(score(3, 1), score(3, 2))


@pytest.mark.parametrize("bad, message", [
    (dict(dim=60, n_heads=8), "divisible by n_heads"),
    (dict(n_heads=4, n_kv_heads=3), "divisible by n_kv_heads"),
    (dict(dim=12, n_heads=4), "must be even"),
    (dict(dropout=1.5), "dropout"),
    (dict(n_layers=0), "n_layers"),
])
def test_model_args_reject_invalid_configs(bad, message):
    with pytest.raises(llama.UserError, match=message):
        tiny_args(**bad)


# ----------------------------------------------------------------------------------------------------
# The whole model


@NEEDS_DAY2
@pytest.mark.parametrize("n_kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("tie", [True, False])
def test_transformer_matches_hf_llama_for_causal_lm(n_kv_heads, tie):
    torch.manual_seed(0)
    model = Transformer(tiny_args(n_kv_heads=n_kv_heads, tie_embeddings=tie)).eval()
    hf = to_hf_llama(model)
    tokens = torch.randint(0, 101, (3, 17))
    with torch.no_grad():
        ours, theirs = model(tokens), hf(tokens).logits
    assert ours.shape == (3, 17, 101)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


@NEEDS_DAY2
def test_changing_future_tokens_never_changes_past_logits():
    torch.manual_seed(0)
    model = Transformer(tiny_args()).eval()
    tokens = torch.randint(0, 101, (2, 20))
    with torch.no_grad():
        base = model(tokens)
        for t in (0, 7, 18):
            changed = tokens.clone()
            changed[:, t + 1:] = torch.randint(0, 101, changed[:, t + 1:].shape)
            torch.testing.assert_close(model(changed)[:, :t + 1], base[:, :t + 1], rtol=0, atol=1e-6)
            assert not torch.allclose(model(changed)[:, t + 1:], base[:, t + 1:])


@NEEDS_DAY2
def test_every_parameter_receives_a_gradient():
    torch.manual_seed(0)
    model = Transformer(tiny_args(n_kv_heads=2, dropout=0.1))
    tokens = torch.randint(0, 101, (2, 12))
    F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"


def test_tied_embeddings_share_one_matrix_and_the_flop_estimate_counts_it_once():
    model = Transformer(tiny_args())
    assert model.output.weight is model.tok_embeddings.weight
    n = sum(p.numel() for p in model.parameters())
    assert model.num_params() == n
    assert model.flops_per_token(32) == 6 * n + 12 * 2 * 64 * 32


def test_sequence_longer_than_max_seq_len_is_refused():
    model = Transformer(tiny_args(max_seq_len=8))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 9, dtype=torch.long))


# ----------------------------------------------------------------------------------------------------
# Data


@pytest.fixture(scope="module")
def streams(tiny_wikitext_dir, tiny_tokenizer_dir):
    tok = llama.load_tokenizer(tiny_tokenizer_dir)
    return tok, llama.tokenize_splits(llama.load_wikitext(tiny_wikitext_dir), tok)


def test_token_streams_decode_back_to_the_raw_files(streams, tiny_wikitext_dir):
    tok, s = streams
    for split, name in llama.WIKITEXT_FILES.items():
        raw = open(f"{tiny_wikitext_dir}/{name}").read()
        assert tok.decode(s[split].tolist()) == raw  # byte-level BPE is lossless: nothing dropped or padded


def test_train_batches_are_contiguous_shifted_windows_without_padding(streams):
    _, s = streams
    tokens = s["train"]
    x, y = next(llama.train_batches(tokens, 16, 4, torch.Generator().manual_seed(0)))
    assert x.shape == y.shape == (4, 16)
    assert torch.equal(x[:, 1:], y[:, :-1])
    text = tokens.tolist()
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        starts = [i for i in range(len(text) - 16) if text[i:i + 16] == row_x]
        assert any(text[i + 1:i + 17] == row_y for i in starts)


def test_train_batches_are_reproducible_from_the_seed(streams):
    _, s = streams
    a = llama.train_batches(s["train"], 16, 4, torch.Generator().manual_seed(3))
    b = llama.train_batches(s["train"], 16, 4, torch.Generator().manual_seed(3))
    for _ in range(5):
        assert torch.equal(next(a)[0], next(b)[0])


def test_eval_windows_predict_every_token_exactly_once(streams):
    _, s = streams
    tokens = s["validation"]
    windows = llama.eval_windows(tokens, 16)
    assert all(len(w) <= 17 for w in windows)
    assert torch.equal(torch.cat([w[1:] for w in windows]), tokens[1:].long())


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_cross_entropy_matches_f_cross_entropy_value_and_gradient(dtype, smoothing):
    torch.manual_seed(0)
    logits = (torch.randn(3, 37, 500) * 6).to(dtype).requires_grad_()
    targets = torch.randint(0, 500, (3, 37))
    ours = llama.cross_entropy(logits, targets, smoothing)
    (ours_grad,) = torch.autograd.grad(ours * 3, logits)
    ref = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), label_smoothing=smoothing)
    (ref_grad,) = torch.autograd.grad(ref * 3, logits)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert ours_grad.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-6)  # bf16: 8-bit mantissa
    torch.testing.assert_close(ours_grad, ref_grad, **tol)


def test_learning_rate_warms_up_linearly_then_decays_by_cosine():
    cfg = llama.TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=100)
    assert llama.learning_rate(0, 0.0, cfg) == pytest.approx(0.1)
    assert llama.learning_rate(9, 0.09, cfg) == pytest.approx(1.0)
    assert llama.learning_rate(50, 0.5, cfg) == pytest.approx(0.55)
    assert llama.learning_rate(100, 1.0, cfg) == pytest.approx(0.1)


@NEEDS_DAY2
def test_evaluate_equals_mean_cross_entropy_over_the_split(streams):
    _, s = streams
    torch.manual_seed(0)
    model = Transformer(tiny_args(vocab_size=320, max_seq_len=16)).eval()
    tokens = s["validation"].long()
    with torch.no_grad():
        nll = []
        for w in llama.eval_windows(tokens, 16):
            nll.append(F.cross_entropy(model(w[None, :-1])[0], w[1:], reduction="none"))
        expected = torch.cat(nll).mean().item()
    assert llama.evaluate(model, tokens, torch.device("cpu")) == pytest.approx(expected, rel=1e-5)


# ----------------------------------------------------------------------------------------------------
# The command line, in process


def run_main(argv, capsys):
    return call_main(llama.main, argv, capsys)


@pytest.fixture
def data_flags(tiny_wikitext_dir, tiny_tokenizer_dir):
    return ["--data-dir", tiny_wikitext_dir, "--tokenizer", tiny_tokenizer_dir]


@NEEDS_DAY2
def test_smoke_training_learns_saves_a_checkpoint_and_reports(tmp_path, data_flags, capsys):
    ckpt, out_dir = tmp_path / "model.pth", tmp_path / "run"
    code, out, err = run_main(["--preset", "smoke", *data_flags, "--checkpoint", str(ckpt), "--output-dir",
                               str(out_dir), "--max-steps", "60", "--eval-interval", "30", "--dim", "48",
                               "--n-heads", "4", "--max-seq-len", "24", "--precision", "fp32"], capsys)
    assert code == 0, err
    metrics = json.loads((out_dir / "metrics.json").read_text())
    for key in ("final_train_loss", "val_perplexity", "test_perplexity", "tokens_seen", "tokens_per_s",
                "wall_time_s", "samples"):
        assert key in metrics, key
    assert metrics["val_perplexity"] < 320 / 4  # far below a uniform guess over the 320-token vocabulary
    assert metrics["samples"][0].startswith("In a world where")
    assert "val_perplexity" in out and "In a world where" in out
    saved = torch.load(ckpt, weights_only=True)
    assert saved["model_args"]["dim"] == 48 and saved["tokenizer"] == data_flags[-1]
    assert not list(tmp_path.glob("*.tmp"))

    # --eval-only rebuilds the model from the checkpoint alone and gets the same test perplexity.
    code, out, err = run_main(["--eval-only", "--checkpoint", str(ckpt), "--split", "test", *data_flags,
                               "--output-dir", str(out_dir), "--precision", "fp32"], capsys)
    assert code == 0, err
    evaluated = json.loads((out_dir / "eval_test.json").read_text())
    assert evaluated["test_perplexity"] == pytest.approx(metrics["test_perplexity"], rel=1e-4)


@NEEDS_DAY2
def test_ctrl_c_saves_the_model_and_reports(tmp_path, data_flags, capsys, monkeypatch):
    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def step_then_interrupt(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", step_then_interrupt)
    ckpt = tmp_path / "model.pth"
    code, out, err = run_main(["--preset", "smoke", *data_flags, "--checkpoint", str(ckpt), "--output-dir",
                               str(tmp_path), "--max-steps", "50", "--eval-interval", "100"], capsys)
    assert code == 130
    assert ckpt.is_file()
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "interrupted" and metrics["steps"] == 2
    assert "Traceback" not in err


@NEEDS_DAY2
def test_nan_loss_stops_keeps_the_last_good_checkpoint_and_reports(tmp_path, data_flags, capsys, monkeypatch):
    real_forward = Transformer.forward
    calls = {"n": 0}

    def forward_then_nan(self, tokens, *a, **k):
        logits = real_forward(self, tokens, *a, **k)
        if self.training:
            calls["n"] += 1
            if calls["n"] >= 4:
                return logits * float("nan")
        return logits

    monkeypatch.setattr(Transformer, "forward", forward_then_nan)
    ckpt = tmp_path / "model.pth"
    code, out, err = run_main(["--preset", "smoke", *data_flags, "--checkpoint", str(ckpt), "--output-dir",
                               str(tmp_path), "--max-steps", "50", "--eval-interval", "1"], capsys)
    assert code == 1
    assert err.strip().splitlines()[-1].startswith("llama.py: error: training diverged")
    assert torch.load(ckpt, weights_only=True)["val_loss"] < math.inf  # the step-3 checkpoint survived
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "nan"


@pytest.mark.parametrize("extra, message", [
    (["--dim", "30", "--n-heads", "4"], "divisible by n_heads"),
    (["--lr", "-1"], "lr"),
    (["--batch-size", "0"], "--batch-size"),
    (["--time-budget", "0"], "--time-budget"),
    (["--label-smoothing", "1"], "--label-smoothing"),
    (["--weight-decay", "-0.1"], "weight decay"),
])
def test_invalid_flags_end_with_one_clear_line(extra, message, tmp_path, data_flags, capsys):
    code, out, err = run_main(["--preset", "smoke", *data_flags, "--checkpoint", str(tmp_path / "c.pth"),
                               *extra], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and message in err and "Traceback" not in err


@NEEDS_DAY2
def test_training_flags_reach_the_loss_and_the_optimizer(tmp_path, data_flags, capsys, monkeypatch):
    seen = {}
    real_loss, real_optimizer = llama.cross_entropy, llama.configure_optimizer

    def spy_loss(logits, targets, label_smoothing=0.0):
        seen["smoothing"] = label_smoothing
        return real_loss(logits, targets, label_smoothing)

    def spy_optimizer(model, cfg):
        seen["weight_decay"] = cfg.weight_decay
        return real_optimizer(model, cfg)

    monkeypatch.setattr(llama, "cross_entropy", spy_loss)
    monkeypatch.setattr(llama, "configure_optimizer", spy_optimizer)
    code, _, _ = run_main(["--preset", "smoke", *data_flags, "--checkpoint", str(tmp_path / "c.pth"), "--output-dir",
                           str(tmp_path), "--label-smoothing", "0.3", "--weight-decay", "0.7"], capsys)
    assert code == 0 and seen == {"smoothing": 0.3, "weight_decay": 0.7}


@NEEDS_DAY2
def test_ctrl_c_after_training_keeps_the_checkpoint_and_exits_130(tmp_path, data_flags, capsys, monkeypatch):
    calls, real_evaluate = [], llama.evaluate

    def interrupt_the_test_split(*args, **kwargs):  # smoke: validation at steps 2 and 4, then the test split
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(llama, "evaluate", interrupt_the_test_split)
    ckpt = tmp_path / "c.pth"
    code, _, err = run_main(["--preset", "smoke", *data_flags, "--checkpoint", str(ckpt), "--output-dir",
                             str(tmp_path)], capsys)
    assert code == 130 and len(calls) == 3
    assert "interrupted" in err.strip().splitlines()[-1] and "Traceback" not in err  # after the progress bars
    llama_commands.load_checkpoint(str(ckpt))  # the best validation checkpoint is whole


def test_missing_or_empty_data_files_are_reported(tmp_path, tiny_tokenizer_dir, capsys):
    (tmp_path / "wiki.train.raw").write_text("some text\n")
    code, _, err = run_main(["--preset", "smoke", "--data-dir", str(tmp_path), "--tokenizer", tiny_tokenizer_dir],
                            capsys)
    assert code == 2 and "wiki.valid.raw is missing" in err
    (tmp_path / "wiki.valid.raw").write_text("")
    (tmp_path / "wiki.test.raw").write_text("text\n")
    code, _, err = run_main(["--preset", "smoke", "--data-dir", str(tmp_path), "--tokenizer", tiny_tokenizer_dir],
                            capsys)
    assert code == 2 and "wiki.valid.raw is empty" in err


def test_unreachable_hub_without_local_data_says_how_to_run_offline(tmp_path, tiny_tokenizer_dir, capsys,
                                                                     monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    code, _, err = run_main(["--preset", "smoke", "--tokenizer", tiny_tokenizer_dir,
                             "--dataset", "nobody/no-such-dataset-here"], capsys)
    assert code == 2 and "--data-dir" in err and "Traceback" not in err


def test_bad_tokenizer_path_and_bad_checkpoint_are_reported(tmp_path, data_flags, capsys):
    code, _, err = run_main(["--preset", "smoke", "--data-dir", data_flags[1], "--tokenizer",
                             str(tmp_path / "nope")], capsys)
    assert code == 2 and "--tokenizer" in err
    code, _, err = run_main(["--eval-only", "--checkpoint", str(tmp_path / "missing.pth"), *data_flags], capsys)
    assert code == 2 and "train one first" in err
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    code, _, err = run_main(["--eval-only", "--checkpoint", str(tmp_path / "junk.pth"), *data_flags], capsys)
    assert code == 2 and "not a readable PyTorch checkpoint" in err
