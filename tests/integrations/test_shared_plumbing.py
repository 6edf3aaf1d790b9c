"""The integration plumbing that needs neither TRL nor verl (runs in the core suite): estimator kwargs checks,
per-step values and planning tokens from decoded responses."""

from __future__ import annotations

import pytest
import torch

from creditlab.integrations._checks import check_estimator_kwargs
from creditlab.integrations._signals import planning_mask, segment, step_labels, step_scores
from creditlab.signals.steps import Segmenter

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tok():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["a", "b", "c", "wait", "let's", "try", ";"]
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    t = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def encode(tok, texts):
    ids = [tok(x, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for x in texts]
    t = max(map(len, ids))
    return (torch.tensor([r + [0] * (t - len(r)) for r in ids]),
            torch.tensor([[True] * len(r) + [False] * (t - len(r)) for r in ids]))


def test_estimator_kwargs_unknown_key_and_bad_value():
    check_estimator_kwargs("tempo", {"td_coef": 0.5}, option="opt")  # fine
    with pytest.raises(ValueError, match=r"^opt: estimator 'tempo' has no hyper-parameter 'tdcoef'"):
        check_estimator_kwargs("tempo", {"tdcoef": 0.5}, option="opt")
    with pytest.raises(ValueError, match=r"^opt: estimator 'pure'.*temperature"):
        check_estimator_kwargs("pure", {"temperature": -1.0}, option="opt")
    # a check that ties parameters together runs inside the estimator: the probe call reaches it
    with pytest.raises(ValueError, match=r"^opt for estimator 'capo': ValueError: .*w_whole > w_process"):
        check_estimator_kwargs("capo", {"w_whole": 1.0, "w_process": 2.0}, option="opt")
    with pytest.raises(KeyError, match="unknown estimator"):
        check_estimator_kwargs("nope", {}, option="opt")


def test_step_values_must_match_each_rows_steps(tok):
    ids, mask = encode(tok, ["a b ; c", "a ; b ; c", "c"])
    seg = segment(ids, mask, tok, Segmenter("regex", ";"))
    assert [len(s) for s in seg.spans] == [2, 3, 1]
    scores = step_scores([[1, 2], [3, 4, 5], [6]], seg, source="src")
    assert scores.tolist() == [[1, 2, 0], [3, 4, 5], [6, 0, 0]]
    assert step_labels([[True, None], [False, 1, -1], [0]], seg, source="src").tolist() == [
        [1, -1, -1], [0, 1, -1], [0, -1, -1]]
    with pytest.raises(ValueError, match=r"src gave \[1\] for row 0, which has 2 step\(s\): \['a b', 'c'\]"):
        step_scores([[1], [3, 4, 5], [6]], seg, source="src")
    with pytest.raises(ValueError, match="step score nan for row 2"):
        step_scores([[1, 2], [3, 4, 5], [float("nan")]], seg, source="src")
    with pytest.raises(ValueError, match="step label 'yes' for row 2"):
        step_labels([[1, 1], [1, 1, 1], ["yes"]], seg, source="src")
    with pytest.raises(ValueError, match="'task' needs"):
        segment(ids, mask, tok, Segmenter("task"))


def test_planning_mask_on_a_word_level_tokenizer(tok):
    """Decoding one token at a time drops a word-level tokenizer's spaces ("let'stry"); the mask must not."""
    ids, mask = encode(tok, ["a let's try b", "wait a", "a b"])
    out = planning_mask(ids, mask, tok)
    assert out[0].tolist()[:5] == [False, True, True, False, False]
    assert out[1].tolist()[:3] == [True, False, False]
    assert not bool(out[2].any())
    assert not bool(out[~mask].any())
