"""Credit diagnostics with names shared across estimators (methods.md §10.8)."""

from __future__ import annotations

import torch
from torch import Tensor


def advantage_metrics(adv: Tensor, mask: Tensor, **extra: float) -> dict[str, float]:
    """Token-level statistics of an advantage tensor over valid tokens, plus estimator-specific extras.

    credit/adv_mean, credit/adv_std, credit/adv_abs_mean, credit/adv_max, credit/adv_min: over valid tokens.
    credit/zero_frac: fraction of valid tokens whose advantage is exactly 0 (e.g. zero-signal groups).
    credit/nonfinite: count of NaN/inf entries (must be 0; the registry refuses such output anyway).
    """
    m = mask.to(torch.bool)
    vals = adv[m].to(torch.float64)
    n = vals.numel()
    out = {
        "credit/adv_mean": float(vals.mean()) if n else 0.0,
        "credit/adv_std": float(vals.std(unbiased=False)) if n else 0.0,
        "credit/adv_abs_mean": float(vals.abs().mean()) if n else 0.0,
        "credit/adv_max": float(vals.max()) if n else 0.0,
        "credit/adv_min": float(vals.min()) if n else 0.0,
        "credit/zero_frac": float((vals == 0).double().mean()) if n else 1.0,
        "credit/nonfinite": float((~torch.isfinite(adv)).sum()),
    }
    out.update({f"credit/{k}": float(v) for k, v in extra.items()})
    return out
