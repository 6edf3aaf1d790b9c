"""benchmarks/vs_trl_summary.py on hand-made records: ratios and paired accuracy differences computed by hand."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "vs_trl_summary.py"


def load():
    spec = importlib.util.spec_from_file_location("vs_trl_summary", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def record(seed: int, ratio: float, cl: dict, tr: dict, steps: int = 10) -> dict:
    side = lambda acc, sps: {"samples_per_s": sps, "steps": steps, "initial_accuracy": acc[0],  # noqa: E731
                             "final_accuracy": acc[steps], "accuracy_at": {str(k): v for k, v in acc.items()}}
    return {"meta": {"seed": seed}, "pairs": {"fp32": {"creditlab": side(cl, 2.0 * ratio), "trl": side(tr, 2.0),
                                                       "ratio_samples_per_s": ratio, "peak_mb_ratio": 0.5}}}


def test_paired_differences_and_ratio_by_hand(tmp_path, capsys):
    m = load()
    paths = []
    for i, rec in enumerate([record(0, 2.0, {0: 0.1, 5: 0.5, 10: 0.75}, {0: 0.1, 5: 0.25, 10: 0.5}),
                             record(1, 4.0, {0: 0.2, 5: 0.25, 10: 0.5}, {0: 0.2, 5: 0.5, 10: 0.5})]):
        paths.append(tmp_path / f"r{i}.json")
        paths[-1].write_text(json.dumps(rec))
    assert m.main([str(p) for p in paths]) == 0
    out = capsys.readouterr().out
    # ratios 2 and 4: mean 3, sample std sqrt(2) = 1.414
    assert "samples/s ratio over 2 records: 3.000 ± 1.414 (min 2.00×, max 4.00×)" in out
    # step 5: differences +0.25 and -0.25 -> mean 0, sample std sqrt(0.125) = 0.354; one ahead, one behind
    assert "| 5 | 0.375 ± 0.177 | 0.375 ± 0.177 | +0.000 ± 0.354 | 1 / 0 / 1 |" in out
    # step 10: differences +0.25 and 0 -> mean +0.125, std 0.177; one ahead, one level
    assert "| 10 | 0.625 ± 0.177 | 0.500 ± 0.000 | +0.125 ± 0.177 | 1 / 1 / 0 |" in out
    assert "| 0 | 4.00 | 2.00 | 2.00× | 0.50× | 0: 0.100 vs 0.100, 5: 0.500 vs 0.250, 10: 0.750 vs 0.500 |" in out
    assert "| 1 | 8.00 | 2.00 | 4.00× | 0.50× |" in out


def test_older_records_without_a_curve_use_start_and_end(tmp_path, capsys):
    m = load()
    rec = record(0, 2.0, {0: 0.1, 5: 0.5}, {0: 0.1, 5: 0.25}, steps=5)
    for side in rec["pairs"]["fp32"].values():
        if isinstance(side, dict) and "accuracy_at" in side:
            del side["accuracy_at"]
    path = tmp_path / "old.json"
    path.write_text(json.dumps(rec))
    assert m.main([str(path)]) == 0
    assert "| 5 | 0.500 ± 0.000 | 0.250 ± 0.000 | +0.250 ± 0.000 | 1 / 0 / 0 |" in capsys.readouterr().out


def test_missing_pair_and_unreadable_file_are_one_line_errors(tmp_path, capsys):
    m = load()
    path = tmp_path / "r.json"
    path.write_text(json.dumps(record(0, 2.0, {0: 0.1, 10: 0.2}, {0: 0.1, 10: 0.2})))
    with pytest.raises(SystemExit, match="no 'bf16' pair in this record"):
        m.main(["--pair", "bf16", str(path)])
    (tmp_path / "bad.json").write_text("{not json")
    assert m.main([str(tmp_path / "bad.json")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_all_pairs_pool_at_each_records_last_evaluation(tmp_path, capsys):
    m = load()
    short = record(0, 2.0, {0: 0.1, 5: 0.5}, {0: 0.1, 5: 0.25}, steps=5)  # fp32, last step 5: +0.25
    short["pairs"]["bf16"] = record(0, 3.0, {0: 0.1, 5: 0.25}, {0: 0.1, 5: 0.5}, steps=5)["pairs"]["fp32"]  # -0.25
    long = record(1, 4.0, {0: 0.2, 5: 0.2, 15: 0.7}, {0: 0.2, 5: 0.3, 15: 0.6}, steps=15)  # last step 15: +0.1
    paths = [tmp_path / "short.json", tmp_path / "long.json"]
    for path, rec in zip(paths, [short, long]):
        path.write_text(json.dumps(rec))
    assert m.main(["--pair", "all", *map(str, paths)]) == 0
    out = capsys.readouterr().out
    assert "| 0 (fp32) |" in out and "| 0 (bf16) |" in out and "| 1 (fp32) |" in out
    assert "samples/s ratio over 3 rows: 3.000 ± 1.000" in out  # ratios 2, 3, 4
    # last evaluations +0.25, -0.25, +0.1: mean 0.0333, sample std 0.2566, se 0.1481; t(0.975, 2) = 4.303 -> half
    # width 0.6375: [-0.604, +0.671]; ahead 2, behind 1: sign test p = 1.0
    assert ("creditlab − TRL at each record's last evaluation, 3 pairs: +0.033 ± 0.257 (standard error 0.148; "
            "95 % t-interval of the mean [-0.604, +0.671]); ahead / level / behind 2 / 0 / 1; "
            "sign test p = 1.00") in out
