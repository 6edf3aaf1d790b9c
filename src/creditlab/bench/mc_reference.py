"""Monte-Carlo ground truth for `creditlab credit-quality --reference mc`: the true advantage of every step, any task.

For a response whose steps are k = 0..n-1 (lines by default, `creditlab.signals.steps`), s_k is the state before
step k's first token (s_0 = the prompt) and s_n the state right after the last step's last token. V(s) is the mean
reward of K continuations sampled from s by the same policy at the same settings as the responses
(`creditlab.signals.mc`: one prefill per state); a continuation is scored by the task exactly as the responses are
(one cut by the length limit included, so that V(s) = E[R | s] for the benchmark's own reward R), and a state that is
the whole response has V = its reward. The true step advantage is

    A_k = V(s_{k+1}) - V(s_k),    standard error sqrt(se_k^2 + se_{k+1}^2),   se = std / sqrt(K)

(Σ_k A_k = V(s_n) - V(s_0)). Only responses with at least two steps get a reference (`mc_responses` of them, drawn at
random with the benchmark's seed).

An estimator's credit of step k is its advantage averaged over the step's tokens (c_k). Two scores per response:

    Spearman   rank correlation of (c_k) with (A_k) over the response's steps (midranks; Pearson of the ranks).
               0 when c is constant within the response (a response-level estimator scores exactly 0); responses
               whose true advantages are all equal have nothing to rank and are left out.
    worst-step AUROC   P(c of another step > c of the step with the most negative A), ties 1/2: does the credit
               single out the step that hurt most? Responses whose lowest A_k is not negative, or where every step
               ties for it, are left out. 0.5 = no localisation.

Both are averaged over responses with percentile-bootstrap 95% intervals over responses (seeded, the same resamples
for every estimator). The MC noise of the reference itself is reported (mean standard error of A_k, K).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from creditlab.batch import RolloutBatch


@dataclass
class Reference:
    """True step advantages of `rows` (n responses, S padded steps)."""

    rows: Tensor  # [n] long rows of the batch
    steps: Tensor  # [n, T] long step index of each token (-1 outside steps)
    advantages: Tensor  # [n, S] float64 A_k (0 past a row's steps)
    stderr: Tensor  # [n, S] float64 standard error of A_k
    valid: Tensor  # [n, S] bool: k < n_steps of the row
    samples: int  # K
    continuations: int  # continuations sampled for the reference


def state_cuts(steps: Tensor, mask: Tensor) -> tuple[list[list[int]], list[bool]]:
    """Per row: the prefix lengths of s_0..s_n (see the module docstring) and whether s_n is the whole response."""
    cuts, terminal = [], []
    for b in range(steps.shape[0]):
        ids = steps[b].tolist()
        n = max(ids) + 1 if ids else 0
        starts = [0] + [ids.index(k) for k in range(1, n)]
        end = max(t for t, k in enumerate(ids) if k == n - 1) + 1 if n else 0
        length = int(mask[b].nonzero().max()) + 1 if bool(mask[b].any()) else 0
        cuts.append([*starts, end] if end < length else starts)
        terminal.append(end >= length)
    return cuts, terminal


def estimate_reference(batch: RolloutBatch, ctx: Any, steps: Tensor, *, responses: int, samples: int, sampling: Any,
                       seed: int, max_rows: int = 512) -> Reference:
    """Sample the reference for up to `responses` rows with >= 2 steps (`steps` [B,T], 0 = all eligible rows)."""
    from creditlab.signals.mc import continuation_values, pad_cuts

    n_steps = (steps.max(dim=1).values + 1).clamp_min(0)  # [B]
    eligible = (n_steps >= 2).nonzero().flatten()
    g = torch.Generator().manual_seed(seed)
    pick = eligible[torch.randperm(len(eligible), generator=g)]
    rows = pick[:responses].sort().values if responses else pick.sort().values  # [n]
    sub = batch.select(rows)
    sub_steps = steps[rows]
    cut_lists, terminal = state_cuts(sub_steps, sub.response_mask)
    counters_before = dict(ctx.counters)
    est = continuation_values(sub, pad_cuts(cut_lists), ctx, samples=samples, sampling=sampling,
                              unfinished_penalty=None, max_rows=max_rows, seed=seed + 7_777)
    continuations = int(ctx.counters.get("samples/extra", 0) - counters_before.get("samples/extra", 0))
    S = int(n_steps[rows].max()) if len(rows) else 1
    V = torch.zeros(len(rows), S + 1, dtype=torch.float64)
    se = torch.zeros_like(V)
    valid = torch.zeros(len(rows), S, dtype=torch.bool)
    for i, (cuts, term) in enumerate(zip(cut_lists, terminal)):
        n = int(n_steps[rows[i]])
        V[i, : len(cuts)] = est.values[i, : len(cuts)].double().cpu()
        se[i, : len(cuts)] = est.stderr[i, : len(cuts)].double().cpu()
        if term:  # s_n is the finished response: its value is the reward, known exactly
            V[i, n], se[i, n] = float(sub.rewards[i]), 0.0
        valid[i, :n] = True
    adv = torch.where(valid, V[:, 1:] - V[:, :-1], 0.0)
    stderr = torch.where(valid, (se[:, 1:] ** 2 + se[:, :-1] ** 2).sqrt(), 0.0)
    return Reference(rows, sub_steps, adv, stderr, valid, samples, continuations)


# ------------------------------------------------------------------------------------------------ scores
def step_credit(adv: Tensor, steps: Tensor, S: int) -> Tensor:
    """Mean advantage over each step's tokens, [n,T] x [n,T] -> [n,S] float64 (0 for a step without tokens)."""
    from creditlab.signals.steps import step_sum

    a = adv.double()
    total = step_sum(a, steps, S)[:, :S]
    count = step_sum(torch.ones_like(a), steps, S)[:, :S]
    return total / count.clamp_min(1)


def midranks(x: Tensor, valid: Tensor) -> Tensor:
    """1-based ranks among each row's valid entries, ties sharing their mean rank; 0 where not valid."""
    keyed = torch.where(valid, x.double(), torch.full_like(x, math.inf, dtype=torch.float64))
    srt = keyed.sort(dim=1).values
    lo = torch.searchsorted(srt, keyed, side="left")
    hi = torch.searchsorted(srt, keyed, side="right")
    return torch.where(valid, (lo + hi + 1).double() / 2, 0.0)


def spearman_rows(x: Tensor, y: Tensor, valid: Tensor) -> Tensor:
    """Per row: Spearman correlation of x and y over valid entries ([n,S] each -> [n] float64); 0 where x or y is
    constant within the row."""
    rx, ry = midranks(x, valid), midranks(y, valid)
    m = valid.sum(dim=1).clamp_min(1).double()[:, None]
    dx = torch.where(valid, rx - (rx.sum(1, keepdim=True) / m), 0.0)
    dy = torch.where(valid, ry - (ry.sum(1, keepdim=True) / m), 0.0)
    den = (dx.pow(2).sum(1) * dy.pow(2).sum(1)).sqrt()
    return torch.where(den > 0, (dx * dy).sum(1) / den.clamp_min(1e-300), 0.0)


def worst_step_masks(true: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """(others [n,S], worst [n,S]): the steps tied for the lowest A_k, and the rest; empty where the lowest A_k is
    not negative or every step ties for it."""
    low = torch.where(valid, true, torch.full_like(true, math.inf)).min(dim=1, keepdim=True).values
    worst = valid & (true == low)
    others = valid & ~worst
    usable = (low.squeeze(1) < 0) & others.any(dim=1)
    return others & usable[:, None], worst & usable[:, None]


def spearman_usable(true: Tensor, valid: Tensor) -> Tensor:
    """[n] bool: responses whose true step advantages are not all equal."""
    hi = torch.where(valid, true, torch.full_like(true, -math.inf)).max(dim=1).values
    lo = torch.where(valid, true, torch.full_like(true, math.inf)).min(dim=1).values
    return (valid.sum(dim=1) >= 2) & (hi > lo)


@dataclass
class MCQualityRow:
    estimator: str
    needs: str
    spearman: float
    spearman_lo: float
    spearman_hi: float
    worst_auroc: float
    worst_lo: float
    worst_hi: float
    note: str = ""


def _boot(per_row: Tensor, resamples: int, seed: int) -> tuple[float, float, float, Tensor]:
    from creditlab.bench.quality import bootstrap_counts, percentile_ci

    if per_row.numel() == 0:
        return math.nan, math.nan, math.nan, torch.zeros(0)
    counts = bootstrap_counts(per_row.numel(), resamples, seed)  # [R, n]
    boot = (counts.double() @ per_row.double()) / per_row.numel()
    return float(per_row.mean()), *percentile_ci(boot), boot


def score_against_reference(advantages: dict[str, Tensor], ref: Reference, *, resamples: int, seed: int,
                            needs: dict[str, str], notes: dict[str, str]) -> tuple[list[MCQualityRow], dict]:
    """One row per estimator (advantages [B,T] of the whole batch), plus the bootstrap means (for the charts)."""
    from creditlab.bench.quality import within_response_auroc

    S = ref.advantages.shape[1]
    rho_ok = spearman_usable(ref.advantages, ref.valid)
    others, worst = worst_step_masks(ref.advantages, ref.valid)
    auc_ok = worst.any(dim=1)
    rows, boots = [], {}
    for name, adv in advantages.items():
        credit = step_credit(adv[ref.rows].cpu(), ref.steps.cpu(), S)  # [n, S]
        rho = spearman_rows(credit, ref.advantages, ref.valid)[rho_ok]
        auc = within_response_auroc(credit, others, worst)[auc_ok]
        s, s_lo, s_hi, s_boot = _boot(rho, resamples, seed)
        w, w_lo, w_hi, _ = _boot(auc, resamples, seed + 1)
        rows.append(MCQualityRow(name, needs.get(name, "-"), s, s_lo, s_hi, w, w_lo, w_hi, notes.get(name, "")))
        boots[name] = s_boot
    return rows, boots


def reference_stats(ref: Reference) -> dict[str, Any]:
    _, worst = worst_step_masks(ref.advantages, ref.valid)
    v = ref.valid
    return {"responses": len(ref.rows), "steps": int(v.sum()), "samples_per_state": ref.samples,
            "continuations": ref.continuations,
            "spearman_responses": int(spearman_usable(ref.advantages, v).sum()),
            "worst_step_responses": int(worst.any(dim=1).sum()),
            "stderr_mean": float(ref.stderr[v].mean()) if bool(v.any()) else math.nan,
            "abs_advantage_mean": float(ref.advantages[v].abs().mean()) if bool(v.any()) else math.nan}


def format_mc_table(rows: Sequence[MCQualityRow]) -> str:
    from creditlab.bench.quality import _f as f  # 3 decimals, "—" for nan: the oracle table's number format

    lines = ["| estimator | needs | Spearman vs MC | 95% CI | worst-step AUROC | 95% CI | note |",
             "|---|---|---:|---|---:|---|---|"]
    for r in rows:
        lines.append(f"| {r.estimator} | {r.needs} | {f(r.spearman)} | [{f(r.spearman_lo)}, {f(r.spearman_hi)}] | "
                     f"{f(r.worst_auroc)} | [{f(r.worst_lo)}, {f(r.worst_hi)}] | {r.note} |")
    return "\n".join(lines)
