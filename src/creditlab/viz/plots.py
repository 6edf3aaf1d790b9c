"""PNG plots for benchmarks: learning curves with shaded seeds, and bar charts with error bars.

Both draw on a bare `matplotlib.figure.Figure` with the Agg canvas: no pyplot global state, no display, no
backend switching for the caller. Colours are the Okabe-Ito palette (distinguishable with colour-vision
deficiencies); line styles also cycle so curves stay apart in greyscale.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np

OKABE_ITO = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000")
LINESTYLES = ("-", "--", "-.", ":")
Spread = Literal["std", "sem", "minmax"]
XScale = Literal["auto", "linear", "symlog"]

Run = tuple[Sequence[float], Sequence[float]]  # one seed: x values [N], y values [N]


def _figure(size: tuple[float, float]):  # -> (Figure, Axes)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=120)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _save(fig, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, format="png")
    return out


def align_seeds(runs: Sequence[Run]) -> tuple[np.ndarray, np.ndarray]:
    """Seeds on one x grid: (x [N], ys [n_seeds, N]).

    Seeds that share their x values are stacked as they are; otherwise each is linearly interpolated onto the
    union of x values inside the range that every seed covers (no extrapolation).
    """
    if not runs:
        raise ValueError("align_seeds: no runs")
    xs = [np.asarray(x, dtype=float) for x, _ in runs]
    ys = [np.asarray(y, dtype=float) for _, y in runs]
    for x, y in zip(xs, ys):
        if x.shape != y.shape or x.ndim != 1 or len(x) == 0:
            raise ValueError(f"align_seeds: each run needs 1-D x and y of one non-zero length, got x {x.shape}, "
                             f"y {y.shape}")
    if all(len(x) == len(xs[0]) and np.array_equal(x, xs[0]) for x in xs):
        return xs[0], np.stack(ys)
    lo, hi = max(x.min() for x in xs), min(x.max() for x in xs)
    grid = np.unique(np.concatenate(xs))
    grid = grid[(grid >= lo) & (grid <= hi)]
    return grid, np.stack([np.interp(grid, *zip(*sorted(zip(x, y)))) for x, y in zip(xs, ys)])


def _spread(ys: np.ndarray, spread: Spread) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(centre, low, high) over axis 0: mean ± std / sem, or mean within min..max."""
    mean = np.nanmean(ys, axis=0)
    if spread == "minmax":
        return mean, np.nanmin(ys, axis=0), np.nanmax(ys, axis=0)
    n = ys.shape[0]
    sd = np.nanstd(ys, axis=0, ddof=1) if n > 1 else np.zeros_like(mean)
    half = sd / np.sqrt(n) if spread == "sem" else sd
    return mean, mean - half, mean + half


def x_scale(curves: Mapping[str, Sequence[Run]], xscale: XScale = "auto") -> tuple[str, float | None]:
    """The x axis for `plot_curves`: ("linear", None) or ("symlog", linthresh).

    "auto" is symlog when one method's longest run reaches more than 10x as far as another's (e.g. Monte-Carlo
    continuations counted as samples beside plain GRPO), so that the short curves are not squeezed against the
    y axis; linear below linthresh (the smallest positive x, so x = 0 stays on the plot), logarithmic above.
    """
    if xscale not in ("auto", "linear", "symlog"):
        raise ValueError(f"xscale must be 'auto', 'linear' or 'symlog', got {xscale!r}")
    if xscale == "linear":
        return "linear", None
    xs = [np.asarray(x, dtype=float) for runs in curves.values() for x, _ in runs]
    every_x = np.concatenate(xs) if xs else np.empty(0)
    positive = every_x[every_x > 0]
    if positive.size == 0:
        return "linear", None
    ends = [max(float(np.max(x)) for x, _ in runs) for runs in curves.values() if runs]
    if xscale == "auto" and not (min(ends) > 0 and max(ends) > 10 * min(ends)):
        return "linear", None
    return "symlog", float(positive.min())


def plot_curves(curves: Mapping[str, Sequence[Run]], out: str | Path, *, title: str = "",
                xlabel: str = "samples", ylabel: str = "accuracy", spread: Spread = "std",
                ylim: tuple[float, float] | None = None, size: tuple[float, float] = (6.4, 4.2),
                xscale: XScale = "auto") -> Path:
    """Mean-over-seeds lines with a shaded band per method; writes a PNG to `out` and returns its path.

    curves: method label -> list of seeds, each an (x, y) pair (e.g. samples seen, eval accuracy).
    spread: the band: mean ± "std" (default), mean ± "sem", or the seeds' "minmax".
    xscale: "linear", "symlog", or "auto" (symlog when the methods' x ranges differ by more than 10x; `x_scale`).
    More than 8 methods put the legend beside the axes instead of over the curves.
    """
    scale, linthresh = x_scale(curves, xscale)
    outside = len(curves) > 8
    fig, ax = _figure((size[0] + 2.4, size[1]) if outside else size)
    for i, (label, runs) in enumerate(curves.items()):
        x, ys = align_seeds(runs)
        mean, low, high = _spread(ys, spread)
        color = OKABE_ITO[i % len(OKABE_ITO)]
        ax.plot(x, mean, color=color, linestyle=LINESTYLES[i // len(OKABE_ITO) % len(LINESTYLES)],
                linewidth=1.8, label=f"{label} (n={ys.shape[0]})")
        if ys.shape[0] > 1:
            ax.fill_between(x, low, high, color=color, alpha=0.2, linewidth=0)
    if scale == "symlog":
        ax.set_xscale("symlog", linthresh=linthresh)
    ax.set_xlabel(xlabel + (" (log scale)" if scale == "symlog" else ""))
    ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_title(title + (f"  (band: {spread})" if title else ""))
    ax.grid(alpha=0.3)
    if curves:
        beside = {"loc": "center left", "bbox_to_anchor": (1.0, 0.5)} if outside else {}
        ax.legend(frameon=False, fontsize="small", **beside)
    return _save(fig, out)


def bar_chart(values: Mapping[str, Sequence[float]] | Mapping[str, Mapping[str, Sequence[float]]],
              out: str | Path, *, title: str = "", ylabel: str = "", spread: Literal["std", "sem"] = "std",
              size: tuple[float, float] | None = None) -> Path:
    """Bars of the mean over seeds with error bars; writes a PNG to `out` and returns its path.

    values: either label -> per-seed values (one bar per label), or group -> label -> per-seed values
            (grouped bars, e.g. task -> method -> final accuracies; one colour per label).
    spread: error bar half-length, the seeds' "std" (default) or "sem"; single-seed bars have none.
    """
    grouped = {k: v for k, v in values.items()} if values and all(isinstance(v, Mapping) for v in
                                                                     values.values()) else {"": values}
    labels = list(dict.fromkeys(lab for g in grouped.values() for lab in g))  # type: ignore[union-attr]
    width = 0.8 / max(len(labels), 1)
    fig, ax = _figure(size or (max(4.0, 1.0 + 0.45 * len(labels) * len(grouped)), 4.2))
    for j, label in enumerate(labels):
        centres, errors, xs = [], [], []
        for g, group in enumerate(grouped.values()):
            if label not in group:  # type: ignore[operator]
                continue
            seeds = np.asarray(group[label], dtype=float)  # type: ignore[index]
            mean, low, _ = _spread(seeds[:, None], spread)
            centres.append(float(mean[0]))
            errors.append(float(mean[0] - low[0]))
            xs.append(g + (j - (len(labels) - 1) / 2) * width)
        ax.bar(xs, centres, width=width * 0.95, yerr=errors, capsize=3, color=OKABE_ITO[j % len(OKABE_ITO)],
               label=label, edgecolor="black", linewidth=0.5)
    if list(grouped) == [""]:
        ax.set_xticks([(j - (len(labels) - 1) / 2) * width for j in range(len(labels))], labels, rotation=30,
                      ha="right")
    else:
        ax.set_xticks(range(len(grouped)), list(grouped))
        ax.legend(frameon=False, fontsize="small")
    ax.set_ylabel(ylabel)
    ax.set_title(title + (f"  (error bars: {spread})" if title else ""))
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, out)


def anytime_curve(metrics_row: Mapping[str, float]) -> tuple[list[int], list[float]]:
    """(budgets, accuracies) from one logged eval row's `eval/acc@<budget>` entries, budgets ascending."""
    pairs = sorted((int(k.split("@", 1)[1]), float(v)) for k, v in metrics_row.items()
                   if k.startswith("eval/acc@") and k.split("@", 1)[1].isdigit())
    return [b for b, _ in pairs], [a for _, a in pairs]


def plot_anytime(curves: Mapping[str, Sequence[Mapping[str, float]]], out: str | Path, *, title: str = "",
                 spread: Spread = "std") -> Path:
    """Anytime accuracy (accuracy when thinking is cut at each budget) vs budget, mean over seeds with a band.

    curves: method label -> one eval row per seed (a metrics.jsonl row holding `eval/acc@<budget>` keys).
    """
    runs = {label: [anytime_curve(row) for row in rows] for label, rows in curves.items()}
    empty = [label for label, rs in runs.items() if any(not b for b, _ in rs)]
    if empty:
        raise ValueError(f"plot_anytime: no eval/acc@<budget> entries for {empty} (train with --budgets)")
    return plot_curves(runs, out, title=title, xlabel="thinking budget (tokens)", ylabel="accuracy at budget",
                       spread=spread, ylim=(0.0, 1.0))
