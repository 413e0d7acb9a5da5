"""The speed choices in llama.py and trainkit give the same numbers as the plain path they replace.

SDPA's is_causal against the explicit causal_mask, the measured choice of decoding kernels (trainkit.kernels),
and the cross-entropy's chunk size rule. No timings are asserted: which path is faster depends on the machine;
these tests check that every path a machine may choose computes the same thing.
"""

import pytest
import torch
import torch.nn.functional as F

import llama
import trainkit
from llama import ModelArgs, Transformer

NEEDS_DAY2 = pytest.mark.needs("rmsnorm", "swiglu", "causal_mask")


def tiny_model(n_kv_heads=None, seed=0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, vocab_size=101,
                                 multiple_of=32, max_seq_len=32))


def explicit_mask(seqlen, start_pos, cache, device=None):
    """attention_mask without the is_causal shortcut: always the student's causal_mask."""
    mask = llama.causal_mask(seqlen, start_pos, device) if seqlen > 1 else None
    return cache.padding_mask(mask, start_pos, seqlen) if cache is not None and cache.pad is not None else mask


@pytest.mark.needs("causal_mask")
def test_attention_mask_uses_is_causal_only_for_a_fresh_unpadded_sequence():
    cache = llama.KVCache(tiny_model().params, 2)
    assert llama.attention_mask(6, 0, None) is llama.CAUSAL  # training and evaluation
    assert llama.attention_mask(6, 0, cache) is llama.CAUSAL  # the first forward of a fresh cache
    assert llama.attention_mask(1, 5, cache) is None  # one new token sees everything cached
    assert torch.equal(llama.attention_mask(3, 4, cache), llama.causal_mask(3, 4))  # a cache offset
    cache.pad_left(torch.tensor([2, 0]))
    padded = llama.attention_mask(6, 0, cache)
    assert padded.shape == (2, 1, 6, 6) and torch.equal(padded, cache.padding_mask(llama.causal_mask(6, 0), 0, 6))


@NEEDS_DAY2
@pytest.mark.parametrize("n_kv_heads", [4, 1], ids=["mha", "mqa"])
def test_is_causal_path_equals_the_explicit_mask_in_forward_and_backward(n_kv_heads, monkeypatch):
    tokens = torch.randint(0, 101, (3, 20), generator=torch.Generator().manual_seed(1))
    results = []
    for mask_fn in (llama.attention_mask, explicit_mask):
        monkeypatch.setattr(llama, "attention_mask", mask_fn)
        model = tiny_model(n_kv_heads).train()  # dropout 0: the same function in train mode
        logits = model(tokens)
        llama.cross_entropy(logits, tokens.roll(-1, dims=1)).backward()
        results.append((logits.detach(), [p.grad for p in model.parameters()]))
    (fast, fast_grads), (plain, plain_grads) = results
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    for a, b in zip(fast_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@NEEDS_DAY2
def test_explicit_mask_path_is_what_cached_prefill_at_an_offset_takes(monkeypatch):
    # The exercise still matters to the whole model: a prefill at start_pos > 0 goes through causal_mask.
    calls = []
    real = llama.causal_mask
    monkeypatch.setattr(llama, "causal_mask", lambda *a, **k: calls.append(a[:2]) or real(*a, **k))
    model = tiny_model().eval()
    cache = llama.KVCache(model.params, 1)
    tokens = torch.randint(0, 101, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        model(tokens[:, :5], 0, cache)
        assert calls == []  # is_causal
        model(tokens[:, 5:], 5, cache)
    assert calls == [(7, 5)]


def test_decoding_kernels_are_measured_once_per_dtype_shapes_and_rows(monkeypatch):
    monkeypatch.setattr(trainkit.kernels, "_ROW_KERNELS", {})
    layer, output = [torch.randn(48, 16), torch.randn(16, 48)], torch.randn(300, 16)
    default = torch.backends.mkldnn.enabled
    first = trainkit.kernels.fastest_row_kernels(layer, 2, output)
    expected = {(True, False), (True, True), (False, False), (False, True)} if torch.backends.mkldnn.is_available() \
        else {(None, False), (None, True)}
    assert set(first.ms_per_step) == expected and all(ms > 0 for ms in first.ms_per_step.values())
    assert (first.onednn, first.transposed_output) in first.ms_per_step
    assert trainkit.kernels.fastest_row_kernels(layer, 2, torch.randn(300, 16)) is first  # cached, not timed again
    trainkit.kernels.fastest_row_kernels([w.bfloat16() for w in layer], 2, output.bfloat16())
    trainkit.kernels.fastest_row_kernels(layer, 2, output, rows=3)
    assert len(trainkit.kernels._ROW_KERNELS) == 3
    assert torch.backends.mkldnn.enabled == default
    assert first.describe().startswith("decoding kernels: ")


def test_kernel_ties_go_to_pytorchs_defaults():
    order = [(True, False), (True, True), (False, False), (False, True)]
    near = {(True, False): 1.04, (True, True): 1.0, (False, False): 1.0, (False, True): 9.0}
    assert trainkit.kernels.first_within(near, order) == (True, False)  # within 5%: the default
    clear = {(True, False): 2.0, (True, True): 1.9, (False, False): 1.0, (False, True): 1.02}
    assert trainkit.kernels.first_within(clear, order) == (False, False)
    assert trainkit.kernels.first_within(clear, order[:2]) == (True, True)  # only among the candidates timed to the end


@pytest.mark.parametrize("rows", [1, 8, 50])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_cross_entropy_over_many_chunks_matches_f_cross_entropy(rows, dtype, monkeypatch):
    # The vocabulary of the tests is small, so the rule gives one chunk; force several, with a ragged last one.
    monkeypatch.setattr(trainkit.losses, "cross_entropy_chunk_rows", lambda vocab, device: rows)
    torch.manual_seed(0)
    logits = (torch.randn(3, 37, 500) * 6).to(dtype).requires_grad_()
    targets = torch.randint(0, 500, (3, 37))
    ours = llama.cross_entropy(logits, targets, 0.1)
    (ours_grad,) = torch.autograd.grad(ours, logits)
    ref = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), label_smoothing=0.1)
    (ref_grad,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-6)
    torch.testing.assert_close(ours_grad, ref_grad, **tol)


def test_chunk_rows_hold_about_2_mib_of_float32_per_thread(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert [trainkit.losses.cross_entropy_chunk_rows(v, cpu) for v in (8192, 32000, 50257)] == [64, 16, 8]
    assert trainkit.losses.cross_entropy_chunk_rows(10 ** 7, cpu) == 1  # never empty
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert trainkit.losses.cross_entropy_chunk_rows(50257, cpu) == 16  # each thread takes half the rows
    assert trainkit.losses.cross_entropy_chunk_rows(50257, torch.device("cuda")) == 4096


@NEEDS_DAY2
def test_casting_the_model_keeps_the_rotary_table_complex():
    torch.manual_seed(0)
    model = llama.Transformer(llama.ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=64, max_seq_len=16)).eval()
    tokens = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        expected = model(tokens)
        model.to(torch.bfloat16)
        assert model.freqs_cis.dtype == torch.complex64 and model.output.weight.dtype == torch.bfloat16
        got = model(tokens).float()
        model.double().float()  # and back: the table is the one it was
    torch.testing.assert_close(got, expected, rtol=0.1, atol=0.1)  # bf16 weights: close, not equal
    torch.testing.assert_close(model.freqs_cis, llama.precompute_freqs_cis(16, 16))
