"""Attention signals (creditlab.signals.attention): WAAD / FAI hand cases (methods.md §5.2), equality with the
statistics of full eager attention maps on a real (tiny, grouped-query) Llama, the sink option, head sets, layer
choice and the punctuation mask."""

import pytest
import torch
from transformers import LlamaForCausalLM

from creditlab.policy import Policy, tiny_config, tiny_tokenizer
from creditlab.rollout.hf import SamplingConfig, generate
from creditlab.signals.attention import (
    AttnSignalConfig,
    accumulate_chunk,
    attention_signals,
    combine_heads,
    default_layers,
    fai_counts,
    punctuation_mask,
    select_heads,
)


def _hand_probs():
    """One head, no prompt, 4 response rows. Row 3: .5 on itself, .5 on s=0; column 0 gets [.5, .2, .5] from 1-3."""
    A = torch.zeros(1, 1, 4, 4)
    A[0, 0, 0, 0] = 1.0
    A[0, 0, 1, [0, 1]] = torch.tensor([0.5, 0.5])
    A[0, 0, 2, [0, 2]] = torch.tensor([0.2, 0.8])
    A[0, 0, 3, [0, 3]] = torch.tensor([0.5, 0.5])
    return A


@pytest.mark.parametrize("window,expected", [(10, 1.5), (2, 1.0)])
def test_waad_hand_case(window, expected):
    # WAAD_3 = .5 min(3 - 0, W) + .5 min(0, W) = 1.5 for W = 10 and 1.0 for W = 2 (methods.md §5.2)
    out = {"dist": torch.zeros(1, 1), "waad": torch.zeros(1, 1, 4), "fai": torch.zeros(1, 1, 4)}
    accumulate_chunk(_hand_probs(), torch.arange(4), torch.ones(1, 4, dtype=torch.bool), 0, window, 1, 3, out)
    assert float(out["waad"][0, 0, 3]) == pytest.approx(expected)


def test_fai_hand_case():
    # FAI_0 with horizon [1, 3] = mean(.5, .2, .5) = .4 (methods.md §5.2)
    out = {"dist": torch.zeros(1, 1), "waad": torch.zeros(1, 1, 4), "fai": torch.zeros(1, 1, 4)}
    mask = torch.ones(1, 4, dtype=torch.bool)
    accumulate_chunk(_hand_probs(), torch.arange(4), mask, 0, 10, 1, 3, out)
    counts = fai_counts(mask, 1, 3)
    assert counts.tolist() == [[3, 2, 1, 0]]
    _, fai, spans, _, _ = combine_heads(out, counts, mask.sum(1), mask, 0.3)
    assert float(fai[0, 0]) == pytest.approx(0.4)
    assert float(fai[0, 3]) == 0.0  # no row in the horizon of the last token
    # span: mean over rows of sum_s A (t - s) = (0 + .5 + .4 + 1.5) / 4
    assert float(spans[0, 0]) == pytest.approx(2.4 / 4)


def test_chunking_does_not_change_the_statistics():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(2, 3, 9, 12, generator=g), -1)  # P = 3 prompt + 9 response positions
    mask = torch.rand(2, 9, generator=g) < 0.8

    def run(chunks):
        out = {"dist": torch.zeros(2, 3), "waad": torch.zeros(2, 3, 9), "fai": torch.zeros(2, 3, 9)}
        for rows in chunks:
            accumulate_chunk(probs[:, :, rows], rows, mask[:, rows], 3, 4, 1, 5, out)
        return out

    whole, parts = run([torch.arange(9)]), run(list(torch.arange(9).split(2)))
    for key in whole:
        torch.testing.assert_close(whole[key], parts[key])


def test_head_sets_and_layers():
    local, glob = select_heads(torch.tensor([[3.0, 1.0, 2.0, 5.0, 4.0, 0.5, 6.0, 7.0, 2.5, 8.0]]), 0.3)
    assert local[0].nonzero().squeeze(1).tolist() == [1, 2, 5]  # three smallest spans
    assert glob[0].nonzero().squeeze(1).tolist() == [6, 7, 9]
    assert default_layers(30) == (10, 12, 15, 18, 20)  # SmolLM2: five evenly spaced in [10, 20]
    assert default_layers(2) == (0, 1)


@pytest.fixture(scope="module")
def gqa_policy():
    tok = tiny_tokenizer()
    cfg = tiny_config(len(tok), n_layers=3, d_model=64, n_heads=4)
    cfg.num_key_value_heads = 2  # grouped-query attention, like SmolLM2 (9 heads, 3 kv heads)
    torch.manual_seed(0)
    return Policy(model=LlamaForCausalLM(cfg).eval(), tokenizer=tok, name="tiny-gqa")


def _brute_force(policy, batch, cfg, layers):
    """WAAD/FAI from the full eager attention maps of every layer (what the hooks must reproduce)."""
    m = policy.model
    ids = torch.cat([batch.prompt_ids, batch.response_ids], 1)
    mask = torch.cat([batch.prompt_mask.long(), torch.ones_like(batch.response_ids)], 1)
    m.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            att = m(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                    output_attentions=True).attentions
    finally:
        m.config._attn_implementation = "sdpa"
    A = torch.stack([att[i] for i in layers], 1).flatten(1, 2).double()  # [B, n, N, N]
    N = ids.shape[1]
    if cfg.sink:
        first = (mask.cumsum(-1) <= cfg.sink) & mask.bool()
        A = A * (~first[:, None, None, :] | torch.eye(N, dtype=torch.bool))
        A = A / A.sum(-1, keepdim=True)
    P, T = batch.prompt_ids.shape[1], batch.response_ids.shape[1]
    waad, fai = torch.zeros(batch.B, T, dtype=torch.float64), torch.zeros(batch.B, T, dtype=torch.float64)
    for b in range(batch.B):
        R = [t for t in range(T) if batch.response_mask[b, t]]
        d = torch.tensor([[P + t - s for s in range(N)] for t in range(T)], dtype=torch.float64).clamp_min(0)
        spans = torch.stack([(A[b, h, P:] * d)[R].sum(-1).mean() for h in range(A.shape[1])])
        local, glob = select_heads(spans[None], cfg.head_frac)
        Al, Ag = A[b, local[0]].mean(0), A[b, glob[0]].mean(0)
        for t in R:
            waad[b, t] = (Al[P + t] * d[t].clamp_max(cfg.window)).sum()
            rows = [u for u in R if cfg.h_lo <= u - t <= cfg.h_hi]
            fai[b, t] = sum(Ag[P + u, P + t] for u in rows) / len(rows) if rows else 0.0
    return waad, fai


@pytest.mark.parametrize("sink", [0, 1])
def test_hooks_match_full_eager_attention_maps(gqa_policy, sink):
    batch = generate(gqa_policy, ["Add 3 and 4.\n", "Hi, compute 2*5 now please.\n"], 2,
                     SamplingConfig(max_new_tokens=24), seed=3)
    cfg = AttnSignalConfig(window=5, h_lo=2, h_hi=9, sink=sink, chunk=7, rows_per_pass=3)
    sig = attention_signals(gqa_policy.model, batch.prompt_ids, batch.prompt_mask, batch.response_ids,
                            batch.response_mask, cfg)
    assert sig.layers == default_layers(3) == (1, 2)
    waad, fai = _brute_force(gqa_policy, batch, cfg, sig.layers)
    torch.testing.assert_close(sig.waad.double(), waad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(sig.fai.double(), fai, atol=1e-6, rtol=1e-4)
    assert (sig.waad[~batch.response_mask] == 0).all() and (sig.fai[~batch.response_mask] == 0).all()


def test_sink_changes_the_signal_and_layers_can_be_chosen(gqa_policy):
    batch = generate(gqa_policy, ["Add 3 and 4.\n"], 2, SamplingConfig(max_new_tokens=20), seed=4)
    args = (gqa_policy.model, batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask)
    raw = attention_signals(*args, AttnSignalConfig(sink=0, h_lo=1))
    dropped = attention_signals(*args, AttnSignalConfig(sink=1, h_lo=1))
    assert not torch.allclose(raw.waad, dropped.waad)
    assert attention_signals(*args, AttnSignalConfig(layers=(0,))).layers == (0,)
    with pytest.raises(ValueError, match="attn-layers"):
        attention_signals(*args, AttnSignalConfig(layers=(7,)))


def test_punctuation_mask():
    tok = tiny_tokenizer()
    ids = torch.tensor([tok("a,b .\n7", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]])
    mask = torch.ones_like(ids, dtype=torch.bool)
    # "a" "," "b" " " "." "\n" "7" <eos>: punctuation/whitespace, special tokens are not
    assert punctuation_mask(ids, mask, tok)[0].tolist() == [False, True, False, True, True, True, False, False]


@pytest.mark.parametrize("kw,needle", [({"window": 0}, "window"), ({"h_lo": 5, "h_hi": 2}, "h_lo"),
                                       ({"head_frac": 0.6}, "head_frac")])
def test_bad_config_is_a_clear_error(kw, needle):
    with pytest.raises(ValueError, match=needle):
        AttnSignalConfig(**kw).validate()


def test_bf16_pass_stays_close_to_fp32(gqa_policy):
    batch = generate(gqa_policy, ["Add 3 and 4.\n"], 2, SamplingConfig(max_new_tokens=16), seed=5)
    args = (gqa_policy.model, batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask)
    fp32 = attention_signals(*args, AttnSignalConfig(h_lo=1))
    bf16 = attention_signals(*args, AttnSignalConfig(h_lo=1, bf16=True))
    assert bf16.waad.dtype == torch.float32 and torch.isfinite(bf16.waad).all()
    torch.testing.assert_close(bf16.waad, fp32.waad, atol=0.1, rtol=0.05)
    torch.testing.assert_close(bf16.fai, fp32.fai, atol=0.02, rtol=0.1)
