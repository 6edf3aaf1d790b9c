"""The chunked LM-head path of `sequence_logprobs` against the full-logits path: values, gradients, memory, hidden;
and its response-length buckets against one full-width forward."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from creditlab.policy import Policy, load_policy
from creditlab.rollout.head import head_logprobs
from creditlab.rollout.hf import SamplingConfig, generate, length_bucket_rows, sequence_logprobs, split_head


@pytest.fixture(scope="module")
def tiny() -> Policy:
    return load_policy("tiny", seed=3)


@pytest.fixture(scope="module")
def ragged(tiny) -> tuple[torch.Tensor, ...]:
    """Groups of 3 samples of 3 prompts (so prompts repeat) plus one lone prompt; ragged responses."""
    bias = torch.zeros(len(tiny.tokenizer))
    bias[tiny.tokenizer.eos_token_id] = 3.0  # p(EOS) ~ 17 %: rows end at different lengths
    handle = tiny.model.lm_head.register_forward_hook(lambda module, args, out: out + bias)
    try:
        batch = generate(tiny, [tiny.format_prompt(q) for q in ["1+2=", "hello world", "x"]], 3,
                         SamplingConfig(max_new_tokens=20), seed=1)
    finally:
        handle.remove()
    assert len(set(batch.response_mask.sum(1).tolist())) > 1
    return batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask


def _run(model, args, **kw):
    model.zero_grad(set_to_none=True)
    logp, ent = sequence_logprobs(model, *args, temperature=0.7, with_entropy=True, **kw)
    weights = torch.linspace(-1.0, 2.0, logp.numel()).reshape(logp.shape)  # a non-uniform upstream gradient
    ((logp * weights).sum() + 0.3 * ent.sum()).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return logp.detach(), ent.detach(), grads


@pytest.mark.parametrize("share", [False, True])
def test_chunked_head_matches_full_logits_values_and_gradients(tiny, ragged, share):
    assert split_head(tiny.model) is not None, "the tiny Llama must take the chunked path"
    V = tiny.model.config.vocab_size
    full = _run(tiny.model, ragged, share_prompts=share, full_logits=True)
    chunked = _run(tiny.model, ragged, share_prompts=share, chunk_logits=5 * V)  # 5 rows per chunk: many chunks
    mask = ragged[3]
    for a, b in zip(full[:2], chunked[:2]):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)
        assert torch.equal(b[~mask], torch.zeros_like(b[~mask]))
    for name_param, g_full, g_chunk in zip(tiny.model.named_parameters(), full[2], chunked[2]):
        assert torch.allclose(g_full, g_chunk, atol=1e-4, rtol=1e-4), name_param[0]
    assert any(g.abs().sum() > 0 for g in chunked[2])


def test_chunked_head_matches_under_no_grad_and_bf16_autocast(tiny, ragged):
    with torch.no_grad():
        a, _ = sequence_logprobs(tiny.model, *ragged, full_logits=True)
        b, _ = sequence_logprobs(tiny.model, *ragged, chunk_logits=7 * tiny.model.config.vocab_size)
        assert torch.allclose(a, b, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            c, _ = sequence_logprobs(tiny.model, *ragged, full_logits=True)
            d, _ = sequence_logprobs(tiny.model, *ragged)
    assert torch.allclose(c, d, atol=0.05)  # both bf16 logits; only the head matmul's blocking differs
    assert (c - a).abs().max() > 1e-4  # autocast did change the numbers: the comparison is not vacuous


def test_backward_keeps_no_full_logits(tiny, ragged):
    """Count what autograd saves for the backward: the chunked path keeps no tensor with a vocabulary dimension."""
    V = tiny.model.config.vocab_size
    saved: list[torch.Size] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.shape)
        return t

    for full in (True, False):
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logp, _ = sequence_logprobs(tiny.model, *ragged, full_logits=full, with_entropy=True)
        vocab_elems = sum(s.numel() for s in saved if len(s) and s[-1] == V)
        B, T = ragged[2].shape
        if full:
            assert vocab_elems >= B * T * V  # the reference path does keep [B, T, V] logits
        else:
            assert vocab_elems <= V * tiny.model.config.hidden_size  # at most the head's weight itself
        logp.sum().backward()
        tiny.model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("share", [False, True])
def test_return_hidden_is_the_state_before_each_response_token(tiny, ragged, share):
    with torch.no_grad():
        logp, _, hidden = sequence_logprobs(tiny.model, *ragged, share_prompts=share, return_hidden=True)
        prompt_ids, prompt_mask, response_ids, response_mask = ragged
        B, T = response_ids.shape
        assert hidden.shape == (B, T, tiny.model.config.hidden_size)
        ids = torch.cat([prompt_ids, response_ids], 1)
        mask = torch.cat([prompt_mask.long(), torch.ones_like(response_ids)], 1)
        out = tiny.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                         output_hidden_states=True)
        want = out.hidden_states[-1][:, -T - 1:-1]  # [B, T, D] the state at the position predicting token t
        valid = torch.arange(1, T + 1) <= (response_mask * torch.arange(1, T + 1)).amax(1, keepdim=True)  # [B, T]
        assert torch.allclose(hidden[valid], want[valid], atol=1e-5)  # past a row's last token: its bucket's zeros
        _, _, unbucketed = sequence_logprobs(tiny.model, *ragged, share_prompts=share, return_hidden=True,
                                             length_buckets=1)
        assert torch.allclose(unbucketed, want, atol=1e-5)  # one full-width forward: every position
        from_hidden = torch.log_softmax(tiny.model.lm_head(hidden).float(), -1)
        from_hidden = from_hidden.gather(-1, response_ids[..., None]).squeeze(-1) * response_mask
        assert torch.allclose(from_hidden, logp, atol=1e-5)
        _, _, full_hidden = sequence_logprobs(tiny.model, *ragged, full_logits=True, return_hidden=True)
        assert torch.allclose(full_hidden[valid], want[valid], atol=1e-5)


def test_head_logprobs_rejects_a_bad_chunk_and_handles_an_empty_mask():
    head = torch.nn.Linear(4, 6)
    hidden, tokens = torch.randn(2, 3, 4), torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="chunk_logits"):
        head_logprobs(hidden, head, tokens, torch.ones(2, 3, dtype=torch.bool), chunk_logits=0)
    logp, ent = head_logprobs(hidden, head, tokens, torch.zeros(2, 3, dtype=torch.bool), with_entropy=True)
    assert torch.equal(logp, torch.zeros(2, 3)) and torch.equal(ent, torch.zeros(2, 3))


def test_length_bucket_rows_hand_case():
    # widths = position after the last valid token: 1, 5, 2, 8 (row 1 has a hole: a masked observation at 2-3)
    mask = torch.tensor([[1, 0, 0, 0, 0, 0, 0, 0],
                         [1, 1, 0, 0, 1, 0, 0, 0],
                         [1, 1, 0, 0, 0, 0, 0, 0],
                         [1, 1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    buckets = length_bucket_rows(mask, 2)  # sorted rows 0, 2 | 1, 3: 2 x 2 + 2 x 8 = 20 of 32 positions
    assert [(r.tolist(), w) for r, w in buckets] == [([0, 2], 2), ([1, 3], 8)]
    assert [(r.tolist(), w) for r, w in length_bucket_rows(mask, 4)] == [([0], 1), ([2], 2), ([1], 5), ([3], 8)]
    full = [(r.tolist(), w) for r, w in length_bucket_rows(mask, 1)]
    assert full == [([0, 1, 2, 3], 8)]
    # saving below 10 %: widths 8, 8, 8, 7 -> 2 x 8 + 2 x 8 = 32 of 32 positions; one full-width bucket
    dense = torch.ones(4, 8, dtype=torch.bool)
    dense[3, 7] = False
    assert [(r.tolist(), w) for r, w in length_bucket_rows(dense, 2)] == full
    # an all-masked row still gets width 1 (a forward always runs, so the graph exists)
    assert [w for _, w in length_bucket_rows(torch.zeros(2, 5, dtype=torch.bool), 2)] == [1, 1]
    assert [w for _, w in length_bucket_rows(torch.tensor([[0, 0, 0, 0, 0], [1, 1, 1, 1, 1]]).bool(), 2)] == [1, 5]


@pytest.mark.parametrize("share, full", [(False, False), (True, False), (False, True), (True, True)])
def test_length_buckets_match_one_full_width_forward(tiny, ragged, share, full):
    mask = ragged[3]
    assert len(length_bucket_rows(mask, 3)) == 3, "the ragged batch must be bucketed: otherwise this test is vacuous"
    seen: list[int] = []  # token positions through the embedding, per call
    hook = tiny.model.get_input_embeddings().register_forward_hook(lambda m, a, out: seen.append(a[0].numel()))
    try:
        one = _run(tiny.model, ragged, share_prompts=share, full_logits=full, length_buckets=1)
        n_one = sum(seen)
        seen.clear()
        three = _run(tiny.model, ragged, share_prompts=share, full_logits=full, length_buckets=3)
        n_three = sum(seen)
    finally:
        hook.remove()
    B, T = mask.shape
    widths = sum(rows.numel() * w for rows, w in length_bucket_rows(mask, 3))
    assert n_one - n_three == B * T - widths > 0  # exactly the skipped padding positions
    for a, b in zip(one[:2], three[:2]):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)
        assert torch.equal(b[~mask], torch.zeros_like(b[~mask]))
    for (name, _), g1, g3 in zip(tiny.model.named_parameters(), one[2], three[2]):
        assert torch.allclose(g1, g3, atol=1e-4, rtol=1e-4), name


def test_length_buckets_reject_zero(tiny, ragged):
    with pytest.raises(ValueError, match="length_buckets"):
        sequence_logprobs(tiny.model, *ragged, length_buckets=0)


def test_length_buckets_fall_back_to_one_shared_bucket_for_other_caches(tiny, ragged, monkeypatch):
    import creditlab.rollout.hf as hf

    with torch.no_grad():
        want, _ = sequence_logprobs(tiny.model, *ragged, length_buckets=1)
        monkeypatch.setattr(hf, "_indexed_cache", lambda cache, index: None)  # a cache that cannot be copied
        seen: list[int] = []
        hook = tiny.model.get_input_embeddings().register_forward_hook(lambda m, a, out: seen.append(a[0].numel()))
        try:
            got, _ = sequence_logprobs(tiny.model, *ragged, length_buckets=3)
        finally:
            hook.remove()
    prompt_ids, prompt_mask, response_ids, _ = ragged
    distinct = torch.unique(torch.where(prompt_mask, prompt_ids, -1), dim=0).shape[0]
    assert seen == [distinct * prompt_ids.shape[1], response_ids.numel()]  # prompts still shared, full width
    assert torch.allclose(got, want, atol=1e-6)
