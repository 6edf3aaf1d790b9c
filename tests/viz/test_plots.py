"""plot_curves / bar_chart write real PNGs; align_seeds puts seeds on one x grid."""

import numpy as np
import pytest

from creditlab.viz.plots import align_seeds, bar_chart, plot_curves, x_scale

pytest.importorskip("matplotlib")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path) -> bool:
    return path.is_file() and path.stat().st_size > 5_000 and path.read_bytes()[:8] == PNG_MAGIC


def test_plot_curves_writes_png(tmp_path):
    x = [0, 64, 128, 256]
    curves = {"grpo": [(x, [0.1, 0.2, 0.3, 0.35]), (x, [0.12, 0.25, 0.28, 0.4])],
              "tempo": [(x, [0.1, 0.3, 0.4, 0.5]), (x, [0.1, 0.2, 0.45, 0.55]), (x, [0.0, 0.3, 0.4, 0.5])],
              "one seed": [(x, [0.2, 0.2, 0.2, 0.2])]}
    out = plot_curves(curves, tmp_path / "sub" / "curves.png", title="arith_chain", spread="sem")
    assert _is_png(out)


def _png_width(path) -> int:
    return int.from_bytes(path.read_bytes()[16:20], "big")  # IHDR width


def test_x_scale_goes_symlog_when_ranges_differ_tenfold():
    grpo = [([0, 192, 384, 768], [0.1, 0.3, 0.5, 0.7])]
    mc = [([0, 2000, 9000], [0.1, 0.3, 0.6]), ([0, 1500, 7000], [0.1, 0.2, 0.5])]
    # ends: grpo 768, mc max(9000, 7000) = 9000 > 10 * 768 -> symlog, linear up to the smallest positive x (192)
    assert x_scale({"grpo": grpo, "mc": mc}) == ("symlog", 192.0)
    # ends 768 and 7000 (mc's first seed only): 7000 < 7680 -> linear
    assert x_scale({"grpo": grpo, "mc": mc[1:]}) == ("linear", None)
    assert x_scale({"grpo": grpo, "mc": mc}, "linear") == ("linear", None)
    assert x_scale({"grpo": grpo}, "symlog") == ("symlog", 192.0)
    assert x_scale({"zero": [([0, 0], [0.1, 0.2])]}, "symlog") == ("linear", None)  # nothing positive to log
    with pytest.raises(ValueError, match="xscale"):
        x_scale({"grpo": grpo}, "log")


def test_plot_curves_many_methods_legend_beside_axes(tmp_path):
    x = [0, 192, 384, 768]
    curves = {f"m{i}": [(x, [0.1, 0.2 + i / 100, 0.3, 0.4])] for i in range(9)}
    curves["mc"] = [([0, 4000, 17000], [0.1, 0.3, 0.6])]
    wide = plot_curves(curves, tmp_path / "wide.png")
    narrow = plot_curves({k: curves[k] for k in ("m0", "mc")}, tmp_path / "narrow.png")
    assert _is_png(wide) and _is_png(narrow)
    assert _png_width(narrow) == 768 and _png_width(wide) == int((6.4 + 2.4) * 120)  # dpi 120


def test_bar_chart_flat_and_grouped(tmp_path):
    assert _is_png(bar_chart({"grpo": [0.3, 0.35, 0.32], "tempo": [0.4, 0.45], "x": [0.1]}, tmp_path / "flat.png",
                             ylabel="final accuracy"))
    grouped = {"arith": {"grpo": [0.3, 0.4], "tempo": [0.5, 0.55]}, "gsm8k": {"grpo": [0.1, 0.12]}}
    assert _is_png(bar_chart(grouped, tmp_path / "grouped.png", title="final accuracy", spread="sem"))


def test_align_seeds_interpolates_on_the_common_range():
    x, ys = align_seeds([([0, 2, 4], [0.0, 2.0, 4.0]), ([1, 3, 5], [1.0, 3.0, 5.0])])
    assert x.tolist() == [1.0, 2.0, 3.0, 4.0]
    assert np.allclose(ys, [[1, 2, 3, 4], [1, 2, 3, 4]])
    x, ys = align_seeds([([0, 1], [0.5, 0.6]), ([0, 1], [0.7, 0.8])])
    assert x.tolist() == [0, 1] and ys.shape == (2, 2)
    with pytest.raises(ValueError):
        align_seeds([([0, 1], [0.5])])
