"""creditlab bench on the micro preset: results layout, report, curves, env record, and resume-by-skip."""

import json

import pytest

from creditlab.bench.learning import (
    PRESETS,
    missing_signals,
    runnable_estimators,
    samples_to_target,
    scorer_for,
    total_samples,
)
from creditlab.cli import main


def test_scorer_mapping_and_runnable_set():
    assert scorer_for("grpo") == ("", "{}")
    assert scorer_for("pure")[0] == "oracle" and scorer_for("prime")[0] == "implicit"
    assert json.loads(scorer_for("oprl")[1]) == {"mode": "oprl"}
    assert missing_signals("gae")  # needs a critic
    runnable = runnable_estimators()
    assert "gae" not in runnable and {"grpo", "tempo", "prime", "oprl", "pure", "tp_grpo"} <= set(runnable)
    assert set(PRESETS["quick"].estimators) <= set(runnable)


def test_samples_and_target():
    assert total_samples({"samples": 128}) == 128  # the trainer's count already includes samples/extra
    assert samples_to_target([0, 128, 256], [0.1, 0.3, 0.5], 0.3) == 128
    assert samples_to_target([0, 128], [0.1, 0.2], 0.3) is None


@pytest.fixture(scope="module")
def micro_bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert main(["bench", "--preset", "micro", "--out", str(out)]) == 0
    return out


def test_micro_bench_writes_results(micro_bench):
    out = micro_bench
    rows = [json.loads(x) for x in (out / "results/arith_chain/grpo/seed0.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2] and "eval/accuracy" in rows[-1] and rows[-1]["samples"] == 32
    report = (out / "report.md").read_text()
    assert "| grpo |" in report and "final acc" in report
    assert (out / "curves.png").stat().st_size > 0
    env = json.loads((out / "results/env.json").read_text())
    for key in ("git_commit", "git_dirty", "torch", "transformers", "creditlab", "python", "settings"):
        assert key in env
    config = json.loads((out / "runs/arith_chain/grpo/seed0/config.json").read_text())
    assert config["run"]["steps"] == 2 and config["rollout"]["group_size"] == 4


def test_rerun_skips_finished_and_extends_by_resuming(micro_bench, capsys):
    out = micro_bench
    metrics = out / "runs/arith_chain/grpo/seed0/metrics.jsonl"
    before = metrics.read_text()
    assert main(["bench", "--preset", "micro", "--out", str(out)]) == 0
    assert "skipped" in capsys.readouterr().out and metrics.read_text() == before
    assert main(["bench", "--preset", "micro", "--out", str(out), "--steps", "3"]) == 0  # resumes from step 2
    assert "resumed" in capsys.readouterr().out
    rows = [json.loads(x) for x in (out / "results/arith_chain/grpo/seed0.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3] and rows[-1]["samples"] == 48
    assert main(["bench", "--preset", "micro", "--out", str(out), "--steps", "4", "--report-only"]) == 0
    report = (out / "report.md").read_text()
    assert "partial: 0 of 1 runs finished" in report and "| grpo |" not in report
    assert [r["step"] for r in read(out)] == [0, 1, 2, 3]  # nothing trained
    config_path = out / "runs/arith_chain/grpo/seed0/config.json"
    config = json.loads(config_path.read_text())
    config["optim"]["lr"] *= 2  # as if the run had been made with other settings
    config_path.write_text(json.dumps(config))
    assert main(["bench", "--preset", "micro", "--out", str(out), "--steps", "3"]) == 2
    assert "other settings" in capsys.readouterr().err


def read(out):
    return [json.loads(x) for x in (out / "runs/arith_chain/grpo/seed0/metrics.jsonl").read_text().splitlines()]


def test_unrunnable_estimator_is_refused(tmp_path, capsys):
    # spo_tree needs a segment-tree rollout, which the benchmark's runs do not use: refused after a probe step
    assert main(["bench", "--preset", "micro", "--estimators", "spo_tree", "--out", str(tmp_path)]) == 2
    assert "spo_tree" in capsys.readouterr().err


def test_cli_help(capsys):
    from creditlab.cli import main as cli_main

    with pytest.raises(SystemExit):
        cli_main(["bench", "--help"])
    assert "--out" in capsys.readouterr().out


def test_no_oracle_selection_skips_label_readers_and_scores_steps_with_the_implicit_prm():
    from creditlab.bench.learning import PRESETS, bench_tasks, oracle_needs, select_estimators

    assert scorer_for("pure", oracle=False)[0] == "implicit" and scorer_for("pure")[0] == "oracle"
    assert oracle_needs("tp_grpo") == ["step_labels"] and not oracle_needs("grpo")
    assert "tp_grpo" not in runnable_estimators(oracle=False) and "pure" in runnable_estimators(oracle=False)
    p = PRESETS["smollm2"]
    assert p.estimators == () and p.seeds >= 3 and not p.oracle and p.results == "benchmarks/results/smollm2"
    names, skipped = select_estimators(p, bench_tasks())  # computed from the registry now
    assert "tp_grpo" in skipped and "oracle" in skipped["tp_grpo"]
    assert {"grpo", "tempo", "pure", "prime"} <= set(names) and not set(names) & set(skipped)
    assert "gae" in skipped or "gae" in names  # probed: runs only if a component fills its values


def test_probe_reports_why_an_estimator_cannot_run():
    from creditlab.bench.learning import bench_tasks, probe

    assert probe("grpo", bench_tasks()["arith_chain"]) == ""
    assert probe("gae", bench_tasks()["arith_chain"]) == ""  # the benchmark gives critic estimators a value head
    assert "--rollout tree" in probe("spo_tree", bench_tasks()["arith_chain"])


def test_committed_results_rebuild_the_report_and_skip_finished_runs(tmp_path, capsys):
    results = tmp_path / "committed"
    argv = ["bench", "--preset", "micro", "--estimators", "grpo,rloo", "--steps", "1", "--out", str(tmp_path / "a"),
            "--results", str(results)]
    assert main(argv) == 0
    assert (results / "arith_chain/rloo/seed0.config.json").exists() and (results / "curves_time.png").exists()
    report = (results / "report.md").read_text()
    assert "Paired with `grpo`" in report and "| rloo | 1 |" in report and "Measured on cpu" in report
    capsys.readouterr()
    fresh = ["bench", "--preset", "micro", "--estimators", "grpo,rloo", "--steps", "1", "--out",
             str(tmp_path / "b"), "--results", str(results)]  # no run directories: as in a fresh clone
    assert main(fresh) == 0
    assert capsys.readouterr().out.count("skipped (committed results)") == 2 and not (tmp_path / "b" / "runs").exists()
    (results / "report.md").unlink()
    assert main([*fresh, "--report-only"]) == 0 and "| rloo |" in (results / "report.md").read_text()
    # runs recorded by separate invocations: --report-only reports the estimators asked for, not only the last's
    only = ["bench", "--preset", "micro", "--estimators", "rloo", "--steps", "1", "--out", str(tmp_path / "c"),
            "--results", str(results)]
    assert main(only) == 0 and "| grpo |" not in (results / "report.md").read_text()
    assert main([*fresh, "--report-only"]) == 0 and "| grpo | - | 1 |" in (results / "report.md").read_text()


def test_paired_table_by_hand():
    from creditlab.bench.learning import format_paired

    def runs(finals, curves):
        return [{"seed": i, "final": f, "accuracy": c} for i, (f, c) in enumerate(zip(finals, curves))]

    per_est = {"grpo": runs([0.5, 0.6, 0.7], [[0.1, 0.3, 0.5], [0.1, 0.4, 0.6], [0.1, 0.5, 0.7]]),
               "rloo": runs([0.6, 0.5, 1.0], [[0.1, 0.3, 0.6], [0.1, 0.4, 0.5], [0.1, 0.5, 1.0]])}
    table = format_paired(per_est)
    # final diffs +0.1, -0.1, +0.3: mean +0.1, sample std 0.2, se 0.11547, t(0.975, 2) = 4.303 -> [-0.397, +0.597];
    # 2 up, 1 down: sign p 1.00. Curve means (evaluations after step 0): grpo 0.4, 0.5, 0.6; rloo 0.45, 0.45, 0.75
    # -> diffs +0.05, -0.05, +0.15: mean +0.05, std 0.1
    assert "| rloo | 3 | +0.100, -0.100, +0.300 | +0.100 ± 0.200 | [-0.397, +0.597] | 2/0/1 | 1.00 | " \
           "+0.050 ± 0.100 | 2/0/1 | 1.00 |" in table, table
    one = format_paired({"grpo": runs([0.5], [[0.1, 0.5]]), "rloo": runs([0.6], [[0.1, 0.6]])})
    assert "| rloo | 1 | +0.100 | +0.100 ± — | — | 1/0/0 | 1.00 | +0.100 ± — |" in one, one  # one seed: no NaN
