"""`make demo`'s pipeline at toy sizes: it runs end to end and prints the table it promises."""

from __future__ import annotations

from creditlab.demo import run_demo


def test_demo_pipeline_runs_and_prints_before_after(tmp_path, capsys):
    results = run_demo(out_root=str(tmp_path / "demo"), sft_steps=2, rl_steps=1, eval_problems=4)
    out = capsys.readouterr().out
    assert [r["estimator"] for r in results] == ["grpo", "tempo"]
    for r in results:
        assert 0.0 <= r["initial_accuracy"] <= 1.0 and 0.0 <= r["final_accuracy"] <= 1.0 and r["steps"] == 1
        assert r["run_dir"] in out
    assert "answer-line slips" in out and "before" in out and "after" in out
    assert "(measured on cpu: " in out and "1 torch threads, torch kernels " in out  # which numbers to compare with
