"""Strategic-gram detector and semantic entropy (methods.md §5.1)."""

import math
import re

import pytest
import torch

from creditlab.signals.strategic import (
    DEFAULT_STRATEGIC_GRAMS,
    entropy_of_counts,
    find_grams,
    gram_counts,
    planning_mask_from_ids,
    planning_mask_from_texts,
    semantic_entropy,
    token_mask_from_spans,
)


def word_spans(text):
    """Tokenizer-like spans: words with their leading space (as byte-level BPE) and punctuation apart."""
    return [(m.start(), m.end()) for m in re.finditer(r" ?\w+|[^\w\s]| +", text)]


def test_default_list_is_curated_and_sane():
    assert 30 <= len(DEFAULT_STRATEGIC_GRAMS) <= 80
    assert len(set(DEFAULT_STRATEGIC_GRAMS)) == len(DEFAULT_STRATEGIC_GRAMS)
    for g in ("let's try", "let me check", "wait", "alternatively", "on second thought", "we need to", "first,",
              "let's verify", "the key is", "notice that", "let me reconsider"):
        assert g in DEFAULT_STRATEGIC_GRAMS


def test_matching_is_case_insensitive_word_bounded_and_whitespace_tolerant():
    grams = ("let's try", "wait", "first,")
    text = "First, compute.  Wait,\nLet's   try again; awaiting waiters wait."
    hits = [(text[s:e], grams[g]) for s, e, g in find_grams(text, grams)]
    assert hits == [("First,", "first,"), ("Wait", "wait"), ("Let's   try", "let's try"), ("wait", "wait")]


def test_longest_gram_wins():
    hits = find_grams("But wait, let me check.", ("wait", "but wait", "let me check", "check"))
    assert [(s, e) for s, e, _ in hits] == [(0, 8), (10, 22)]


def test_token_mask_from_spans_maps_overlaps():
    text = "So, let me check: 2+2=4. Wait no."
    spans = word_spans(text)
    mask = token_mask_from_spans(text, spans)
    planning = [text[s:e] for (s, e), m in zip(spans, mask.tolist()) if m]
    assert planning == [" let", " me", " check", " Wait"]
    # special tokens with empty spans are never planning tokens; spans past the end are clamped
    assert token_mask_from_spans(text, [(0, 0), (4, 7), (100, 120)]).tolist() == [False, True, False]
    assert token_mask_from_spans("", []).numel() == 0


def test_planning_mask_from_texts_with_offsets_pads_and_truncates():
    texts = ["Alternatively, we need to add.", "nothing here", ""]
    offsets = [word_spans(t) for t in texts]
    m = planning_mask_from_texts(texts, offsets=offsets)
    assert m.shape == (3, len(offsets[0]))
    assert m[0, :6].tolist() == [True, False, True, True, True, False]
    assert not m[1:].any()
    assert planning_mask_from_texts(texts, offsets=offsets, T=2).shape == (3, 2)
    with pytest.raises(ValueError, match="offsets"):
        planning_mask_from_texts(texts)


def _tiny_fast_tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["Let me check the sum. Wait, that is wrong.", "Alternatively, we need to try a different approach.",
              "First, notice that x = 2. Then, let's verify."] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def test_with_a_real_fast_tokenizer():
    tok = _tiny_fast_tokenizer()
    texts = ["Wait, LET ME CHECK the sum.", "We compute x. Alternatively, notice that y = 3."]
    mask = planning_mask_from_texts(texts, tok)
    enc = tok(texts, add_special_tokens=False, return_offsets_mapping=True)
    chosen = ["".join(text[s:e] for (s, e), m in zip(enc["offset_mapping"][b], mask[b].tolist()) if m)
              for b, text in enumerate(texts)]
    assert chosen == ["WaitLET ME CHECK", "Alternatively notice that"]
    assert not mask[0, len(enc["input_ids"][0]):].any()
    # the id route (decode piece by piece) agrees with the offset route; a special token is never planning
    eos = tok.convert_tokens_to_ids("<eos>")
    rows = [[*r, eos] for r in enc["input_ids"]]
    width = max(map(len, rows))
    ids = torch.zeros(2, width, dtype=torch.long)
    valid = torch.zeros(2, width, dtype=torch.bool)
    for b, row in enumerate(rows):
        ids[b, : len(row)] = torch.tensor(row)
        valid[b, : len(row)] = True
    from_ids = planning_mask_from_ids(ids, valid, tok)
    for b, row in enumerate(enc["input_ids"]):
        assert torch.equal(from_ids[b, : len(row)], mask[b, : len(row)])
        assert not from_ids[b, len(row):].any()


def test_semantic_entropy():
    assert entropy_of_counts([2, 1, 1]) == pytest.approx(0.5 * math.log(2) + 2 * 0.25 * math.log(4))
    assert entropy_of_counts([2, 1, 1]) == pytest.approx(1.0397, abs=1e-4)
    assert entropy_of_counts([0, 0]) == 0.0 and entropy_of_counts([5, 0]) == 0.0
    grams = ("wait", "let me check", "alternatively")
    texts = ["Wait, let me check. wait.", "Alternatively, no.", "plain"]
    assert gram_counts(texts, grams).tolist() == [2, 1, 1]
    assert semantic_entropy(texts, grams) == pytest.approx(1.0397, abs=1e-4)
    assert semantic_entropy(texts, grams, clusters=[0, 0, 1]) == pytest.approx(entropy_of_counts([3, 1]))
    assert semantic_entropy(["no grams"], grams) == 0.0
