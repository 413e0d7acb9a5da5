"""Small fixtures for the Day 2 and generation tests: a byte-level BPE tokenizer trained on the spot and
a WikiText-shaped folder of a few kilobytes, so no test needs the Hub or the real data."""

import random

import pytest

WORDS = ("the cat dog city river king army war ship song film game team year storm road bridge church "
         "school island village north south early later first second large small old new").split()
VERBS = "was built became moved won lost formed opened played wrote".split()


def wikitext_article(rng: random.Random, title: str, n_paragraphs: int) -> str:
    """An article in WikiText-2's raw layout: ' = Title = ' headings, blank lines, ' , ' spaced punctuation."""
    lines = [" \n", f" = {title} = \n", " \n"]
    for _ in range(n_paragraphs):
        sentences = []
        for _ in range(rng.randint(2, 5)):
            words = [rng.choice(WORDS) for _ in range(rng.randint(3, 8))]
            words.insert(rng.randint(1, len(words) - 1), rng.choice(VERBS))
            sentences.append(" ".join(words).capitalize() + f" in {rng.randint(1800, 2020)} .")
        lines += [" " + " ".join(sentences) + " \n", " \n"]
    return "".join(lines)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    """A GPT-2-style byte-level BPE tokenizer with a vocabulary of 320, saved like a Hub folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    corpus = [wikitext_article(rng, f"Topic {i}", 4) for i in range(30)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    path = tmp_path_factory.mktemp("tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_wikitext_dir(tmp_path_factory):
    """wiki.train.raw / wiki.valid.raw / wiki.test.raw with a few thousand tokens each."""
    rng = random.Random(1)
    path = tmp_path_factory.mktemp("wikitext")
    for name, n_articles in (("wiki.train.raw", 12), ("wiki.valid.raw", 3), ("wiki.test.raw", 3)):
        text = "".join(wikitext_article(rng, f"{name} {i}", 5) for i in range(n_articles))
        (path / name).write_text(text)
    return str(path)


@pytest.fixture(autouse=True)
def decode_in_float32(monkeypatch):
    """Generation decodes with the weights' dtype and backend that timed steps say are fastest
    (extras/fast_decoding.py). Where two take about as long, that choice can differ between two runs, and so
    can the tokens; the tests decode with float32 weights on PyTorch, where the tokens are the lesson model's.
    Tests of the choice itself and of the C backend ask for them (tests/test_fast_decoding.py)."""
    import torch
    from extras import fast_decoding

    def pinned(model, dtype=None, backend=None):
        return (dtype or torch.float32, backend or "torch"), "float32 on PyTorch in the tests"

    monkeypatch.setattr(fast_decoding, "choose_decoding", pinned)
