"""`creditlab speed` on tiny sizes: one row per registered estimator, finite ratios, sane batches and output."""

import math

import torch

from creditlab.bench.speed import (
    SpeedRow,
    _LocalLM,
    add_speed_args,
    format_table,
    parse_sizes,
    realistic_batch,
    run_speed,
    run_speed_bench,
    time_loop,
    time_step,
)
from creditlab.credit.loops import LOOPS
from creditlab.registry import list_estimators


def test_every_registered_estimator_gets_a_finite_row():
    rows, label = run_speed_bench([(12, 16)], loop_budget=0.5, min_time=0.0, step_tokens=64)
    names = list_estimators()
    assert [r.estimator for r in rows] == names  # 12 rows: a group of 8 and a ragged group of 4
    for r in rows:
        assert not r.note.startswith("error"), f"{r.estimator}: {r.note}"
        assert math.isfinite(r.vectorized_s) and r.vectorized_s > 0 and r.checked_s > 0
        if r.estimator in LOOPS:
            assert math.isfinite(r.ratio) and r.ratio > 0, r
        assert 0 < r.share < 1
    text = format_table(rows)
    assert all(name in text for name in names)
    assert "tiny policy" in label or "local torch" in label


def test_realistic_batch_shares_prefixes_in_groups_of_eight():
    batch = realistic_batch(20, 64, seed=1)
    assert batch.B == 20 and batch.T == 64
    assert torch.bincount(batch.group_ids).tolist() == [8, 8, 4]
    for name in ("prompt_ids", "logprobs", "step_ids", "mc_values", "attn_fai", "turn_ids", "anchor_obs", "texts"):
        assert getattr(batch, name) is not None, name
    assert int(batch.response_ids.max()) > 1000  # a large vocabulary
    shared = (batch.response_ids[1, :8] == batch.response_ids[:1, :8]).all() or \
        any(bool((batch.response_ids[b, :4] == batch.response_ids[a, :4]).all()) for a in range(8) for b in range(a))
    assert shared


def test_time_loop_extrapolates_from_whole_groups():
    batch = realistic_batch(32, 8)
    seen = []
    secs, rows = time_loop(lambda b: seen.append(b.B) or sum(range(10_000)), batch, budget=0.0)
    assert rows == 8 and seen == [8] and secs > 0  # one group, scaled to B
    secs, rows = time_loop(lambda b: None, batch, budget=10.0)
    assert rows == 32


def test_markdown_and_cli(capsys):
    assert parse_sizes("64x512, 8×16") == [(64, 512), (8, 16)]
    row = SpeedRow("grpo", 8, 16, vectorized_s=1e-3, checked_s=2e-3, loop_s=5e-2, loop_rows=4, step_s=1.0, step_rows=2)
    assert row.ratio == 50 and abs(row.share - 2e-3 / 1.002) < 1e-12
    md = format_table([row], markdown=True)
    assert md.splitlines()[0].startswith("| estimator |") and "~50×" in md and "~1 s" in md
    import argparse

    parser = argparse.ArgumentParser()
    add_speed_args(parser)
    assert run_speed(parser.parse_args(["--sizes", "8x8", "--estimators", "grpo", "--no-step", "--markdown",
                                        "--min-time", "0"])) == 0
    out = capsys.readouterr().out
    assert "| grpo | 8×8 |" in out and "measured with torch" in out


def test_fallback_reference_model_steps():
    batch = realistic_batch(4, 8)
    secs, rows = time_step(batch, _LocalLM(), 128, step_tokens=16)
    assert rows == 2 and secs > 0
