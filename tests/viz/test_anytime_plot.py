"""plot_anytime draws accuracy-vs-budget curves from logged eval rows (eval/acc@<budget>)."""

import pytest

from creditlab.viz.plots import anytime_curve, plot_anytime

pytest.importorskip("matplotlib")


def test_anytime_curve_reads_budget_keys_in_order():
    row = {"eval/acc@128": 0.5, "eval/acc@64": 0.25, "eval/accuracy": 0.6, "eval/anytime_auc": 0.4, "step": 3}
    assert anytime_curve(row) == ([64, 128], [0.25, 0.5])


def test_plot_anytime_writes_png_and_rejects_rows_without_budgets(tmp_path):
    rows = {"grpo": [{"eval/acc@64": 0.1, "eval/acc@128": 0.3}, {"eval/acc@64": 0.2, "eval/acc@128": 0.3}],
            "brpo": [{"eval/acc@64": 0.3, "eval/acc@128": 0.4}]}
    out = plot_anytime(rows, tmp_path / "anytime.png", title="arith_chain")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5_000
    with pytest.raises(ValueError, match="--budgets"):
        plot_anytime({"grpo": [{"eval/accuracy": 0.3}]}, tmp_path / "bad.png")
