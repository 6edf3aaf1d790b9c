"""Checks shared by the TRL trainer and the verl plugin, run when a run is configured (not at its first step)."""

from __future__ import annotations

import inspect
from typing import Any

from creditlab.registry import get_spec


def check_estimator_kwargs(name: str, kwargs: dict[str, Any], *, option: str) -> None:
    """Raise a one-line `ValueError` naming `option` when `kwargs` do not fit estimator `name`.

    Two checks: every key must be a keyword of the estimator's signature, and one call of the estimator with
    `kwargs` on a small synthetic batch (every field filled, `creditlab.sample.random_batch`) must succeed. The
    call catches out-of-range values (`eps=-1`), wrong modes and wrong types, which estimators validate only
    when they run. If the synthetic batch fails with the defaults too, the probe says nothing and the values
    are checked at the first real step instead.
    """
    spec = get_spec(name)
    params = inspect.signature(spec.raw).parameters
    allowed = [k for k, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"{option}: estimator {name!r} has no hyperparameter(s) {unknown}; its hyperparameters "
                         f"and defaults: {spec.defaults}")
    if not kwargs:
        return
    from creditlab.sample import random_batch

    probe = random_batch(n_groups=2, max_group=3, min_group=2, T=6, seed=0, empty_row_prob=0.0)
    try:
        spec.fn(probe, **kwargs)
    except Exception as e:  # any failure with these values is reported against the option
        try:
            spec.fn(probe)
        except Exception:  # the probe cannot exercise this estimator
            return
        raise ValueError(f"{option} for estimator {name!r}: {type(e).__name__}: {e}") from None
