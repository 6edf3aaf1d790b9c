"""Rollout with the tiny policy: shapes, EOS masking, determinism, signal consistency, continuation."""

from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from creditlab.policy import Policy, load_policy
from creditlab.rollout.hf import (
    SamplingConfig,
    _top_p_filter,
    continue_from,
    generate,
    sequence_logprobs,
)

QUESTIONS = ["1+2=", "hello world", "x"]


@pytest.fixture(scope="module")
def tiny() -> Policy:
    return load_policy("tiny", seed=0)


@pytest.fixture()
def eos_prone(tiny):
    """The tiny policy with +3 on the EOS logit (p(EOS) ≈ 17 %), so that rows end at different lengths."""
    bias = torch.zeros(len(tiny.tokenizer))
    bias[tiny.tokenizer.eos_token_id] = 3.0
    handle = tiny.model.lm_head.register_forward_hook(lambda module, args, out: out + bias)
    yield tiny
    handle.remove()


def _prompts(policy: Policy) -> list[str]:
    return [policy.format_prompt(q) for q in QUESTIONS]


def test_generate_shapes_groups_and_eos_masking(eos_prone):
    p, n, cfg = eos_prone, 4, SamplingConfig(max_new_tokens=24)
    batch = generate(p, _prompts(p), n, cfg, seed=0, group_offset=10).validate()
    B, T = batch.response_ids.shape
    assert B == len(QUESTIONS) * n and T <= cfg.max_new_tokens
    assert batch.group_ids.tolist() == [10 + i for i in range(len(QUESTIONS)) for _ in range(n)]
    assert torch.equal(batch.rewards, torch.zeros(B))
    ids, mask = p.encode_prompts(_prompts(p))
    assert torch.equal(batch.prompt_ids, ids.repeat_interleave(n, 0))
    assert torch.equal(batch.prompt_mask, mask.repeat_interleave(n, 0))
    eos, pad = p.tokenizer.eos_token_id, p.tokenizer.pad_token_id
    lengths = batch.response_mask.sum(1)
    assert len(set(lengths.tolist())) > 1, "the EOS-prone policy should give ragged lengths"
    for row, m, length, text in zip(batch.response_ids, batch.response_mask, lengths.tolist(), batch.texts):
        assert m[:length].all() and not m[length:].any()  # a prefix mask
        valid = row[:length].tolist()
        assert eos not in valid[:-1]  # nothing after the first EOS is in the response
        assert valid[-1] == eos or length == cfg.max_new_tokens
        assert (row[length:] == pad).all()
        assert text == p.tokenizer.decode(valid, skip_special_tokens=True) and "<eos>" not in text
    for name in ("logprobs", "entropies", "certainty", "token_logits"):
        values = getattr(batch, name)
        assert values.dtype == torch.float32 and (values[~batch.response_mask] == 0).all(), name
    V = len(p.tokenizer)
    assert (batch.entropies >= 0).all() and (batch.entropies <= math.log(V) + 1e-4).all()
    assert (batch.certainty[batch.response_mask] >= math.log(V) - 1e-4).all()
    assert (batch.logprobs <= 0).all()


def test_generate_is_deterministic_given_seed_and_keeps_global_rng(tiny):
    cfg = SamplingConfig(max_new_tokens=16)
    state = torch.random.get_rng_state()
    a = generate(tiny, _prompts(tiny), 2, cfg, seed=5)
    b = generate(tiny, _prompts(tiny), 2, cfg, seed=5)
    c = generate(tiny, _prompts(tiny), 2, cfg, seed=6)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.response_ids, c.response_ids)


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9), (0.0, 1.0)])
def test_rollout_logprobs_match_a_recomputed_forward(eos_prone, temperature, top_p):
    cfg = SamplingConfig(temperature=temperature, top_p=top_p, max_new_tokens=20)
    batch = generate(eos_prone, _prompts(eos_prone), 3, cfg, seed=1)
    with torch.no_grad():
        logp, ent = sequence_logprobs(eos_prone.model, batch.prompt_ids, batch.prompt_mask, batch.response_ids,
                                      batch.response_mask, temperature=temperature, with_entropy=True)
    assert torch.allclose(logp, batch.logprobs, atol=1e-4, rtol=0)
    assert torch.allclose(ent, batch.entropies, atol=1e-4, rtol=0)


def test_sequence_logprobs_gradient_masking_and_padding_invariance(tiny):
    batch = generate(tiny, _prompts(tiny), 2, SamplingConfig(max_new_tokens=12), seed=2)
    mask = batch.response_mask.clone()
    mask[0, 6:] = False  # a shorter row: positions past it must be exactly 0
    logp, ent = sequence_logprobs(tiny.model, batch.prompt_ids, batch.prompt_mask, batch.response_ids, mask)
    assert ent is None and (logp[~mask] == 0).all()
    logp.sum().backward()
    grads = [q.grad for q in tiny.model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    tiny.model.zero_grad(set_to_none=True)
    extra = 3  # more left padding changes nothing
    pad_ids = torch.full((batch.B, extra), tiny.tokenizer.pad_token_id)
    with torch.no_grad():
        padded, _ = sequence_logprobs(tiny.model, torch.cat([pad_ids, batch.prompt_ids], 1),
                                      torch.cat([torch.zeros_like(pad_ids, dtype=torch.bool), batch.prompt_mask], 1),
                                      batch.response_ids, mask)
    assert torch.allclose(padded, logp.detach(), atol=1e-5)


def test_shared_prompt_forward_matches_one_forward_per_row(eos_prone):
    """Each group's prompt runs once and its KV cache serves the G rows: same log-probs, entropies and gradients
    as one forward over prompt + response per row (also with a lone prompt among repeated ones)."""
    model = eos_prone.model
    prompts = _prompts(eos_prone)
    batch = generate(eos_prone, prompts, 3, SamplingConfig(max_new_tokens=14), seed=4)
    lone = generate(eos_prone, [eos_prone.format_prompt("7*8")], 1, SamplingConfig(max_new_tokens=14), seed=9)
    T = max(batch.response_ids.shape[1], lone.response_ids.shape[1])

    def widen(x: torch.Tensor, fill: int | bool) -> torch.Tensor:
        return torch.nn.functional.pad(x, (0, T - x.shape[1]), value=fill)

    pad = eos_prone.tokenizer.pad_token_id
    P = batch.prompt_ids.shape[1]
    left = (P - lone.prompt_ids.shape[1], 0)  # left-pad the lone prompt to the batch's width
    lone_ids = torch.nn.functional.pad(lone.prompt_ids, left, value=pad)
    lone_mask = torch.nn.functional.pad(lone.prompt_mask, left, value=False)
    args = (torch.cat([batch.prompt_ids, lone_ids]), torch.cat([batch.prompt_mask, lone_mask]),
            torch.cat([widen(batch.response_ids, pad), widen(lone.response_ids, pad)]),
            torch.cat([widen(batch.response_mask, False), widen(lone.response_mask, False)]))
    results = []
    for share in (False, True):
        model.zero_grad(set_to_none=True)
        logp, ent = sequence_logprobs(model, *args, temperature=0.7, with_entropy=True, share_prompts=share)
        (logp.sum() + 0.1 * ent.sum()).backward()
        results.append((logp.detach(), ent.detach(), [q.grad.clone() for q in model.parameters()]))
    model.zero_grad(set_to_none=True)
    (lp0, e0, g0), (lp1, e1, g1) = results
    assert torch.allclose(lp0, lp1, atol=1e-5) and torch.allclose(e0, e1, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-4, rtol=1e-4) for a, b in zip(g0, g1))


def test_shared_prompt_forward_falls_back_without_repeats(tiny):
    batch = generate(tiny, _prompts(tiny), 1, SamplingConfig(max_new_tokens=8), seed=0)
    args = (batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask)
    with torch.no_grad():
        a, _ = sequence_logprobs(tiny.model, *args, share_prompts=True)
        b, _ = sequence_logprobs(tiny.model, *args, share_prompts=False)
    assert torch.equal(a, b)


def test_bf16_sampling_gives_a_valid_batch(tiny):
    batch = generate(tiny, _prompts(tiny), 2, SamplingConfig(max_new_tokens=8, bf16=True), seed=0).validate()
    assert batch.logprobs.dtype == torch.float32 and tiny.model.dtype == torch.float32
    assert (batch.entropies >= -1e-3).all()


def test_continue_from_reproduces_a_greedy_response(tiny):
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=16)
    batch = generate(tiny, [tiny.format_prompt("hello")], 1, greedy, seed=0)
    prompt = batch.prompt_ids[0][batch.prompt_mask[0]].tolist()
    response = batch.response_ids[0][batch.response_mask[0]].tolist()
    assert len(response) > 5
    for k in (0, 5):
        conts = continue_from(tiny, [prompt + response[:k]], 2, greedy, seed=0)
        assert len(conts) == 1 and len(conts[0]) == 2
        assert conts[0][0][:len(response) - k] == response[k:]  # starts where the prefix ends
        assert conts[0][0] == conts[0][1]  # greedy: every continuation is the same


def test_continue_from_ragged_prefixes_and_eos(eos_prone):
    p, cfg = eos_prone, SamplingConfig(max_new_tokens=10)
    prefixes = [p.tokenizer("ab\n")["input_ids"], p.tokenizer("a longer prefix\nxy")["input_ids"]]
    conts = continue_from(p, prefixes, 3, cfg, seed=4)
    assert [len(c) for c in conts] == [3, 3]
    eos = p.tokenizer.eos_token_id
    for cont in (c for per_prefix in conts for c in per_prefix):
        assert 1 <= len(cont) <= cfg.max_new_tokens and eos not in cont[:-1]
        assert cont[-1] == eos or len(cont) == cfg.max_new_tokens
    assert conts == continue_from(p, prefixes, 3, cfg, seed=4)
    chunked = continue_from(p, prefixes, 3, cfg, seed=4, max_rows=3)  # one prefix per chunk
    assert [len(c) for c in chunked] == [3, 3]


def test_top_p_keeps_the_smallest_covering_set():
    probs = torch.tensor([[0.2, 0.5, 0.3], [1.0, 0.0, 0.0]])
    assert torch.equal(_top_p_filter(probs, 0.6), torch.tensor([[0.0, 0.5, 0.3], [1.0, 0.0, 0.0]]))
    assert torch.equal(_top_p_filter(probs, 0.01), torch.tensor([[0.0, 0.5, 0.0], [1.0, 0.0, 0.0]]))


def test_dropping_finished_rows_keeps_greedy_decoding_and_its_signals(tiny):
    """Greedy decoding does not touch the RNG: with and without compaction of finished rows it must give the same
    tokens, mask and per-token signals (up to the float noise of a smaller matmul batch)."""
    from creditlab.rollout.hf import sample_tokens

    p, eos = tiny, tiny.tokenizer.eos_token_id

    def stop_sometimes(module, args, out):  # EOS becomes the argmax where a hidden feature is large: ragged ends
        out = out.clone()
        out[..., eos] += 50.0 * (args[0][..., 0] > 1.0)
        return out

    handle = p.model.lm_head.register_forward_hook(stop_sometimes)
    try:
        ids, mask = p.encode_prompts(_prompts(p) * 3)
        cfg = SamplingConfig(temperature=0.0, max_new_tokens=24)
        outs = [sample_tokens(p.model, ids, mask, cfg, generator=torch.Generator().manual_seed(0),
                              stop_ids=p.stop_ids, pad_id=p.tokenizer.pad_token_id, compact=c)
                for c in (0.0, 1.0)]  # never / at every stop
    finally:
        handle.remove()
    plain, compacted = outs
    assert len(set(plain.mask.sum(1).tolist())) > 1  # rows do finish at different steps
    assert torch.equal(plain.tokens, compacted.tokens) and torch.equal(plain.mask, compacted.mask)
    for a, b in zip((plain.logprobs, plain.entropies, plain.certainty), (compacted.logprobs, compacted.entropies,
                                                                         compacted.certainty)):
        assert torch.allclose(a, b, atol=1e-4)


def test_sampling_with_compaction_matches_the_scored_logprobs(eos_prone):
    p = eos_prone
    batch = generate(p, _prompts(p), 4, SamplingConfig(max_new_tokens=20), seed=5).validate()
    assert len(set(batch.response_mask.sum(1).tolist())) > 1
    with torch.no_grad():
        logp, _ = sequence_logprobs(p.model, batch.prompt_ids, batch.prompt_mask, batch.response_ids,
                                    batch.response_mask)
    assert torch.allclose(logp, batch.logprobs, atol=1e-4)  # every row's tokens and signals stay in place


def _sampling_z_scores(policy: Policy, batch, probs_fn, min_expected: float = 10.0) -> torch.Tensor:
    """z-scores of the sampled tokens' counts against the probabilities `probs_fn(logits)` says they were drawn from.

    For every prompt, response position t and token v: observed = #rows whose token t is v; expected = the sum over
    the rows alive at t of p(v | that row's prefix). Each row's draw at t is independent given its prefix, so
    (observed - expected) / sqrt(sum p (1 - p)) is ~N(0, 1) when the sampler draws from p (a martingale CLT; the
    prefixes are themselves sampled). The probabilities come from one plain forward over prompt + response, not
    from the sampler's KV cache. Only (t, v) cells with at least `min_expected` expected draws are kept."""
    ids = torch.cat([batch.prompt_ids, batch.response_ids], dim=1)
    mask = torch.cat([batch.prompt_mask.long(), torch.ones_like(batch.response_ids)], dim=1)
    with torch.no_grad():
        logits = policy.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                              use_cache=False).logits.float()
    T = batch.response_ids.shape[1]
    p = probs_fn(logits[:, -T - 1:-1])  # [B, T, V]: the distribution of response token t given its prefix
    alive = batch.response_mask.float()[..., None]  # [B, T, 1]
    observed = torch.nn.functional.one_hot(batch.response_ids, p.shape[-1]).float() * alive
    zs = []
    for g in batch.group_ids.unique():
        rows = batch.group_ids == g
        exp_ = (p[rows] * alive[rows]).sum(0)  # [T, V]
        var = (p[rows] * (1 - p[rows]) * alive[rows]).sum(0)
        keep = exp_ >= min_expected
        zs.append(((observed[rows].sum(0) - exp_) / var.clamp_min(1e-12).sqrt())[keep])
    return torch.cat(zs)


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_sampler_draws_from_the_models_distribution(eos_prone, temperature, top_p):
    """4 prompts x 1500 samples x 4 tokens: every well-populated (prompt, position, token) count is within 5 standard
    deviations of what softmax(logits / temperature) (after the top-p filter) predicts; drawing from another
    temperature is caught by the same statistic (the test can fail)."""
    cfg = SamplingConfig(temperature=temperature, top_p=top_p, max_new_tokens=4)
    prompts = [eos_prone.format_prompt(q) for q in [*QUESTIONS, "9*9="]]
    batch = generate(eos_prone, prompts, 1500, cfg, seed=11)

    def model_probs(tau: float):
        def probs(logits: torch.Tensor) -> torch.Tensor:
            q = torch.softmax(logits / tau, dim=-1)
            if top_p < 1.0:
                q = _top_p_filter(q, top_p)
                q = q / q.sum(-1, keepdim=True)
            return q
        return probs

    z = _sampling_z_scores(eos_prone, batch, model_probs(temperature))
    assert z.numel() >= 40, "too few well-populated cells: the check says little"
    assert float(z.abs().max()) < 5.0, sorted(z.abs().tolist())[-5:]
    wrong = _sampling_z_scores(eos_prone, batch, model_probs(temperature * 1.25))
    assert float(wrong.abs().max()) > 8.0  # a sampler 25 % off in temperature would fail the check above
