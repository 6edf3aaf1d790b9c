"""Policy losses: pure functions over [B,T] tensors. No estimator logic, no trainer state.

- `ppo_clip_loss`: PPO clipped surrogate with separate low/high clip (DAPO clip-higher) and optional
  dual-clip, returning per-token losses and diagnostics.
- `aggregate`: the four loss aggregation modes, chosen once by name.
- `kl_penalty`: k1, k2, k3 estimators of KL(pi || pi_ref) per token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

AggMode = Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
KLKind = Literal["k1", "k2", "k3"]
AGG_MODES: tuple[str, ...] = AggMode.__args__  # type: ignore[attr-defined]


def micro_weights(mask: Tensor, parts: Sequence[Tensor], mode: AggMode = "token-mean") -> list[float]:
    """Weights w_j with aggregate(L, mask[M]) == sum_j w_j aggregate(L[p_j], mask[p_j]) for row index sets p_j
    that partition a minibatch M: its share of valid tokens (token-mean) or of responses with a valid token (the
    seq-mean modes). Gradient accumulation over micro-batches with these weights gives the minibatch's gradient
    exactly (up to float summation order)."""
    if mode == "token-mean":
        counts = [float(mask[p].sum()) for p in parts]
    else:
        counts = [float((mask[p].sum(-1) > 0).sum()) for p in parts]
    total = sum(counts)
    return [c / total if total > 0 else 1.0 for c in counts]  # no valid token anywhere: every loss is 0


def aggregate(loss_mat: Tensor, mask: Tensor, mode: AggMode = "token-mean", *,
              norm_constant: float | None = None) -> Tensor:
    """Reduce per-token losses [B,T] to a scalar over valid tokens.

    token-mean:              sum_{b,t} l m / sum_{b,t} m  (verl default; each token weighs the same)
    seq-mean-token-sum:      mean over responses of sum_t l m
    seq-mean-token-mean:     mean over responses of (sum_t l m / sum_t m)  (the GRPO paper's 1/|o_i|)
    seq-mean-token-sum-norm: mean over responses of (sum_t l m) / C with an explicit constant C (Dr. GRPO: its
                             reference, oat's `masked_sum(..., constant_normalizer=generate_max_length)` then
                             `.mean()` over rows, and verl's `agg_loss`; C = the maximum response length.
                             verl's default C is each micro-batch's padded length, which drifts; here C is
                             required so it cannot).
    Responses with no valid token are left out of the sequence means (oat's mean also counts a minibatch's
    token-less rows; a sampled response always has at least one token). No valid token at all gives 0 (still
    attached to the graph, so backward() works).
    """
    m = mask.to(loss_mat.dtype)
    masked = loss_mat * m
    if mode == "token-mean":
        return masked.sum() / m.sum().clamp_min(1.0)
    if mode == "seq-mean-token-sum-norm":
        if norm_constant is None or norm_constant <= 0:
            raise ValueError("aggregation 'seq-mean-token-sum-norm' needs a positive norm_constant "
                             f"(e.g. the maximum response length), got {norm_constant}")
    lengths = m.sum(-1)  # [B]
    has_tokens = (lengths > 0).to(loss_mat.dtype)
    if mode == "seq-mean-token-sum-norm":
        per_seq = masked.sum(-1) / norm_constant
    elif mode == "seq-mean-token-sum":
        per_seq = masked.sum(-1)
    elif mode == "seq-mean-token-mean":
        per_seq = masked.sum(-1) / lengths.clamp_min(1.0)
    else:
        raise ValueError(f"unknown loss aggregation {mode!r}; choose one of {list(AGG_MODES)}")
    return (per_seq * has_tokens).sum() / has_tokens.sum().clamp_min(1.0)


def ppo_clip_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, *,
                  clip_low: float = 0.2, clip_high: float = 0.2, dual_clip: float | None = None,
                  agg: AggMode = "token-mean", norm_constant: float | None = None) -> tuple[Tensor, dict[str, float]]:
    """PPO clipped surrogate loss (to minimise), all inputs [B,T].

    ratio = exp(logp - old_logp); per token l = max(-A ratio, -A clip(ratio, 1 - clip_low, 1 + clip_high)).
    clip_high > clip_low is DAPO's clip-higher (e.g. 0.2 / 0.28). Dual-clip (Ye et al. 2020, arXiv
    1912.09729): for A < 0 the loss is additionally capped at -A * dual_clip (dual_clip > 1, e.g. 3.0), so a
    huge ratio on a negative-advantage token cannot dominate.
    Returns (scalar loss, metrics) with metrics pg/clipfrac (fraction of valid tokens where the clipped
    branch was taken), pg/clipfrac_dual, pg/approx_kl (k3 of old vs new, mean over valid tokens),
    pg/ratio_max.
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    if clip_low < 0 or clip_high < 0:
        raise ValueError(f"clip_low and clip_high must be >= 0, got {clip_low}, {clip_high}")
    log_ratio = (logp - old_logp).clamp(-20.0, 20.0)  # exp overflow guard; far outside any clip range
    ratio = torch.exp(log_ratio)
    adv = advantages.detach()
    pg1 = -adv * ratio
    pg2 = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(pg1, pg2)
    dual_hit = torch.zeros_like(per_token, dtype=torch.bool)
    if dual_clip is not None:
        capped = torch.minimum(per_token, -adv * dual_clip)
        dual_hit = (adv < 0) & (capped < per_token)
        per_token = torch.where(adv < 0, capped, per_token)
    loss = aggregate(per_token, mask, agg, norm_constant=norm_constant)
    with torch.no_grad():
        m = mask.to(torch.bool)
        n = m.sum().clamp_min(1)
        metrics = {
            "pg/clipfrac": float(((pg2 > pg1) & m).sum() / n),
            "pg/clipfrac_dual": float((dual_hit & m).sum() / n),
            "pg/approx_kl": float(((ratio - 1 - log_ratio) * m).sum() / n),
            "pg/ratio_max": float(ratio[m].max()) if bool(m.any()) else 1.0,
        }
    return loss, metrics


def kl_penalty(logp: Tensor, ref_logp: Tensor, kind: KLKind = "k3") -> Tensor:
    """Per-token estimator of KL(pi || pi_ref) from log-probs of sampled tokens (Schulman, "Approximating
    KL divergence", 2020). With x = ref_logp - logp:
    k1 = -x (unbiased, can be negative); k2 = x^2 / 2; k3 = exp(x) - x - 1 (unbiased, >= 0; the GRPO paper's).
    k3's log-ratio is clamped to [-20, 20] before exp so one wild token cannot produce inf.
    """
    x = ref_logp - logp
    if kind == "k1":
        return -x
    if kind == "k2":
        return 0.5 * x * x
    if kind == "k3":
        x = x.clamp(-20.0, 20.0)
        return torch.exp(x) - x - 1.0
    raise ValueError(f"unknown KL estimator {kind!r}; choose one of ['k1', 'k2', 'k3']")
