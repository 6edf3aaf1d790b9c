"""Step segmentation (signals/steps.py): text rules, the token rule, char-level and byte-level BPE tokenizers."""

from types import SimpleNamespace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from creditlab.batch import RolloutBatch
from creditlab.policy import tiny_tokenizer
from creditlab.signals.steps import (
    Segmenter,
    assign_tokens,
    n_steps_of,
    pad_step_values,
    split_steps,
    step_ids_signal,
    step_sum,
    token_char_spans,
)
from creditlab.tasks import get_task

BPE_CORPUS = ["7 + 5 = 12.\n12 * 3 = 36.\n\n36 - 4 = 32.\nAnswer: 32\n", "First we add.\n\nThen we multiply.\nDone.\n",
              "a = 1.\nb = 2.\n\nc = a + b.\n"]


@pytest.fixture(scope="module")
def bpe():
    """A byte-level BPE tokenizer trained here on a corpus whose merges glue "\\n" to text (".\\n12", "36.\\n\\n")."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(BPE_CORPUS * 40, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def batch_from_texts(tokenizer, texts, extra_pad=2):
    """Right-padded RolloutBatch of the encoded texts (plus an EOS and some padding columns)."""
    rows = [[*tokenizer.encode(t, add_special_tokens=False), tokenizer.eos_token_id] for t in texts]
    T = max(len(r) for r in rows) + extra_pad
    ids = torch.full((len(rows), T), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.bool)
    for b, r in enumerate(rows):
        ids[b, : len(r)], mask[b, : len(r)] = torch.tensor(r), True
    return RolloutBatch(response_ids=ids, response_mask=mask, group_ids=torch.arange(len(rows)),
                        rewards=torch.zeros(len(rows)), texts=list(texts))


def reference_assign(text, token_spans, step_spans):
    """Loop version of the token rule (module docstring of signals/steps.py)."""
    out = []
    for s, e in token_spans:
        if e <= s:
            out.append(next((k for k, (a, z) in enumerate(step_spans) if a <= s - 1 < z), -1) if s > 0 else -1)
            continue
        first = next((i for i in range(s, e) if not text[i].isspace()), None)
        k = next((k for k, (a, z) in enumerate(step_spans) if first is not None and a <= first < z), None)
        if k is None:
            overlaps = [max(0, min(e, z) - max(s, a)) for a, z in step_spans]
            best = max(overlaps, default=0)
            k = overlaps.index(best) if best > 0 else -1
        out.append(k)
    return out


# ------------------------------------------------------------------ text rules
def test_split_newline_trims_and_drops_blank_lines():
    text = "  7 + 5 = 12 \n\n12 * 3 = 36\n \nAnswer: 36\n"
    spans = split_steps(text, "newline")
    assert [text[s:e] for s, e in spans] == ["7 + 5 = 12", "12 * 3 = 36", "Answer: 36"]


def test_split_double_newline_and_regex():
    text = "Step one.\nstill one.\n\n  Step two.\n \nStep three."
    assert [text[s:e] for s, e in split_steps(text, "double_newline")] == \
        ["Step one.\nstill one.", "Step two.", "Step three."]
    text = "a=1; b=2;;c=3"
    assert [text[s:e] for s, e in split_steps(text, "regex", pattern=r";")] == ["a=1", "b=2", "c=3"]
    with pytest.raises(ValueError, match="pattern"):
        split_steps(text, "regex")
    with pytest.raises(ValueError, match="unknown"):
        Segmenter("sentences")


def test_no_steps():
    assert split_steps("", "newline") == []
    assert split_steps(" \n\n \n", "double_newline") == []
    assert assign_tokens("\n\n", [(0, 1), (1, 2)], []).tolist() == [-1, -1]


# ------------------------------------------------------------------ token rule
def test_token_rule_hand_case():
    # tokens as a byte-level BPE might cut them: "12" | ".\n12" | " * 3" | " 36.\n\n" | "36" | "\n\n" | "\nA" | "ns"
    text = "12.\n12 * 3 = 36.\n\n36\n\n\nAns"
    toks = [(0, 2), (2, 6), (6, 10), (10, 18), (18, 20), (20, 22), (22, 24), (24, 26)]
    spans = split_steps(text, "newline")
    assert [text[s:e] for s, e in spans] == ["12.", "12 * 3 = 36.", "36", "Ans"]
    got = assign_tokens(text, toks, spans).tolist()
    # ".\n12" starts with "." -> step 0; " 36.\n\n" -> step 1; "\n\n" -> no step; "\nA" -> step 3 (first non-ws)
    assert got == [0, 0, 1, 1, 2, -1, 3, 3]
    assert got == reference_assign(text, toks, spans)


def test_empty_span_token_takes_the_completed_character():
    text = "é\nb"
    assert assign_tokens(text, [(0, 1), (1, 1), (1, 2), (2, 3)], split_steps(text)).tolist() == [0, 0, -1, 1]


@given(text=st.text(alphabet="ab1+= .\n", max_size=40), mode=st.sampled_from(["newline", "double_newline"]))
def test_vectorized_rule_equals_loop_bpe_and_char(bpe, text, mode):
    for tok in (tiny_tokenizer(), bpe):
        ids = tok.encode(text, add_special_tokens=False)
        spans, decoded = token_char_spans(tok, ids)
        assert decoded == text
        steps = split_steps(text, mode)
        got = assign_tokens(text, spans, steps).tolist()
        assert got == reference_assign(text, spans, steps)
        # invariants: a token in step k overlaps step k; a token in no step overlaps none; steps ascend
        for (s, e), k in zip(spans, got):
            if k >= 0:
                assert min(e, steps[k][1]) > max(s, steps[k][0])
            else:
                assert all(min(e, z) <= max(s, a) for a, z in steps)
        inside = [k for k in got if k >= 0]
        assert inside == sorted(inside)


def test_bpe_merges_newline_with_text(bpe):
    text = "7 + 5 = 12.\n12 * 3 = 36.\n\n36 - 4 = 32.\nAnswer: 32"
    ids = bpe.encode(text, add_special_tokens=False)
    pieces = [bpe.decode([i]) for i in ids]
    assert any("\n" in p and p.strip() for p in pieces), pieces  # the case the rule exists for
    spans, decoded = token_char_spans(bpe, ids)
    assert decoded == text
    step_ids = assign_tokens(text, spans, split_steps(text, "newline")).tolist()
    for p, k in zip(pieces, step_ids):
        if p.startswith(".\n") or p.startswith("\n"):
            assert k >= 0  # glued tokens still belong to a step
    # every token of "Answer: 32" is in step 3 (the last), none of the first line's tokens is
    assert step_ids[-1] == 3 and step_ids[0] == 0
    assert sorted(set(step_ids) - {-1}) == [0, 1, 2, 3]


def test_slow_path_equals_fast_path(bpe):
    text = "12 * 3 = 36.\n\n36 - 4 = 32."
    ids = bpe.encode(text, add_special_tokens=False)
    fast, _ = token_char_spans(bpe, ids)
    slow, prev = [], 0
    for t in range(len(ids)):
        end = len(bpe.decode(ids[: t + 1]))
        slow.append((prev, end))
        prev = end
    assert fast == slow


def test_multibyte_characters_bpe(bpe):
    text = "héllo wörld\n✓ done"
    ids = bpe.encode(text, add_special_tokens=False)
    spans, decoded = token_char_spans(bpe, ids)
    assert decoded == text
    got = assign_tokens(text, spans, split_steps(text)).tolist()
    assert got == reference_assign(text, spans, split_steps(text))
    pieces = [text[s:e] for s, e in spans]
    assert [p for p, k in zip(pieces, got) if k == -1] == ["\n"]  # only the separator is in no step
    assert set(got) == {-1, 0, 1}  # the bytes of "✓" go to step 1, of "é"/"ö" to step 0


# ------------------------------------------------------------------ batch level
def test_segment_char_tokenizer_exact_and_masked():
    tok = tiny_tokenizer()
    texts = ["1 + 2 = 3\n3 * 2 = 6\nAnswer: 6", "\n\n", "x"]
    batch = batch_from_texts(tok, texts)
    seg = Segmenter("newline").segment(batch, SimpleNamespace(policy=SimpleNamespace(tokenizer=tok)))
    assert seg.texts == texts and seg.num_steps == 3
    row0 = seg.step_ids[0, : len(texts[0])].tolist()
    expected = [0] * 9 + [-1] + [1] * 9 + [-1] + [2] * 9
    assert row0 == expected
    assert (seg.step_ids[~batch.response_mask] == -1).all()
    assert seg.step_ids[0, len(texts[0])] == -1  # EOS (decodes to nothing) is in no step
    assert (seg.step_ids[1] == -1).all()  # zero-step row
    assert n_steps_of(seg.step_ids).tolist() == [3, 0, 1]
    batch.replace(step_ids=seg.step_ids).validate()


def test_segment_bpe_batch(bpe):
    texts = ["7 + 5 = 12.\n12 * 3 = 36.\n\n36 - 4 = 32.", "First we add.\n\nThen we multiply."]
    batch = batch_from_texts(bpe, texts)
    out = step_ids_signal(batch, SimpleNamespace(policy=SimpleNamespace(tokenizer=bpe)), mode="double_newline")
    assert n_steps_of(out["step_ids"]).tolist() == [2, 2]
    assert (out["step_ids"][~batch.response_mask] == -1).all()


def test_task_mode_uses_verifier_spans():
    tok = tiny_tokenizer()
    task = get_task("arith_chain", n_steps=2, max_operand=5)
    problem = task.problems("train", 1, seed=0)[0]
    text = task.demonstration(problem) + "\nextra words"
    batch = batch_from_texts(tok, [text])
    ctx = SimpleNamespace(policy=SimpleNamespace(tokenizer=tok), scores=[task.score(problem, text)])
    seg = Segmenter("task").segment(batch, ctx)
    assert seg.num_steps == 2
    answer_at = text.index("Answer")
    assert (seg.step_ids[0, answer_at: len(text)] == -1).all()  # only the step lines are steps
    with pytest.raises(ValueError, match="step_spans"):
        Segmenter("task").segment(batch, SimpleNamespace(policy=ctx.policy, scores=[None]))
    with pytest.raises(ValueError, match="differs"):
        Segmenter("task").segment(batch.replace(texts=["other"]), ctx)


def test_step_sum_and_padding():
    step_ids = torch.tensor([[0, 0, -1, 1, -1], [-1, -1, -1, -1, -1]])
    values = torch.tensor([[1.0, 2.0, 100.0, 3.0, 100.0], [5.0, 5.0, 5.0, 5.0, 5.0]])
    assert step_sum(values, step_ids, 2).tolist() == [[3.0, 3.0], [0.0, 0.0]]
    assert step_sum(values[1:], step_ids[1:], 0).shape == (1, 1)  # S >= 1 even with no steps
    padded = pad_step_values([[0.5, 1.0], []], 0)
    assert padded.tolist() == [[0.5, 1.0], [0.0, 0.0]]
    assert pad_step_values([[], []], 0).shape == (2, 1)


# ------------------------------------------------------------------ the run's step rule (RunConfig.step_split)
def _ctx(scores, step_split="auto"):
    from creditlab.signals.produce import SignalContext

    cfg = SimpleNamespace(run=SimpleNamespace(step_split=step_split))
    return SignalContext(policy=SimpleNamespace(tokenizer=tiny_tokenizer()), scores=scores, cfg=cfg)


def test_auto_step_split_uses_the_verifier_steps_else_lines():
    from creditlab.signals.produce import produce_signals

    text = "1 + 2 = 3.\nso 3\nAnswer: 3"
    batch = batch_from_texts(tiny_tokenizer(), [text])
    no_spans = [SimpleNamespace(correct=True)]  # e.g. chain_sum, gsm8k: the verifier has no step spans
    lines = produce_signals(batch, ["step_ids"], _ctx(no_spans)).step_ids
    assert n_steps_of(lines).tolist() == [3]  # three non-empty lines
    spans = [SimpleNamespace(correct=True, step_spans=[(0, 10)], step_labels=[1])]  # one verifier step
    task = produce_signals(batch, ["step_ids"], _ctx(spans)).step_ids
    assert n_steps_of(task).tolist() == [1]
    forced = produce_signals(batch, ["step_ids"], _ctx(spans, "newline")).step_ids
    assert torch.equal(forced, lines)  # an explicit rule wins over the verifier's steps
    with pytest.raises(ValueError, match="step_spans"):
        produce_signals(batch, ["step_ids"], _ctx(no_spans, "task"))


@pytest.mark.parametrize("field", ["step_labels", "step_rewards"])
def test_verifier_fields_refuse_steps_of_another_rule(field):
    from creditlab.signals.produce import produce_signals

    spans = [SimpleNamespace(correct=True, step_spans=[(0, 10)], step_labels=[1])]
    with pytest.raises(ValueError, match=f"{field} from the task verifier.*'newline'"):
        produce_signals(batch_from_texts(tiny_tokenizer(), ["1 + 2 = 3.\nso 3"]), [field], _ctx(spans, "newline"))


def test_step_split_option_is_checked():
    from creditlab.train.config import RunConfig

    with pytest.raises(ValueError, match="--step-split must be one of"):
        RunConfig(step_split="lines").validate()
