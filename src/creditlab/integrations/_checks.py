"""Checks shared by the TRL trainer and the verl plugin, run when a run is configured (not at its first step)."""

from __future__ import annotations

from typing import Any

from creditlab.registry import check_hyperparams, get_spec


def check_estimator_kwargs(name: str, kwargs: dict[str, Any], *, option: str) -> None:
    """Raise a one-line `ValueError` naming `option` when `kwargs` do not fit estimator `name`.

    Two checks: the registry's own keyword/type/range checks (`check_hyperparams`), then one call of the
    estimator with `kwargs` on a small synthetic batch (every field filled, `creditlab.sample.random_batch`),
    which catches the checks that tie parameters together inside an estimator (capo's `w_whole > w_process`).
    If the synthetic batch fails with the defaults too, the probe says nothing and those values are checked at
    the first real step instead.
    """
    spec = get_spec(name)
    try:
        check_hyperparams(name, spec.params, kwargs)
    except ValueError as e:
        raise ValueError(f"{option}: {e}") from None
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
