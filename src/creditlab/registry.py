"""The estimator registry: one dict, one decorator, no bypass.

    @estimator("grpo")
    def grpo(batch: RolloutBatch, *, eps: float = 1e-6) -> Credit: ...

`estimator(...)` returns a *checked* callable: every call (through `get_estimator(name)` or by importing the
function) validates the batch, checks the declared `needs`, runs the estimator under `torch.no_grad()`, and
checks the output contract (shape [B,T], finite, exactly 0 outside `response_mask`). The unchecked function
is kept as `.raw` for tests that want to probe the math alone.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from creditlab.batch import FIELDS, Credit, RolloutBatch


class EstimatorFn(Protocol):
    def __call__(self, batch: RolloutBatch, **hyperparams: Any) -> Credit: ...


@dataclass(frozen=True)
class EstimatorSpec:
    """A registered estimator: its name, the batch fields it reads beyond the required ones, and its function."""

    name: str
    needs: tuple[str, ...]
    fn: Callable[..., Credit]  # the checked callable
    raw: Callable[..., Credit]  # the bare math

    @property
    def summary(self) -> str:
        doc = inspect.getdoc(self.raw) or ""
        return doc.splitlines()[0] if doc else ""

    @property
    def defaults(self) -> dict[str, Any]:
        sig = inspect.signature(self.raw)
        return {k: p.default for k, p in sig.parameters.items()
                if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is not inspect.Parameter.empty}


_REGISTRY: dict[str, EstimatorSpec] = {}


def estimator(name: str, needs: tuple[str, ...] = ()) -> Callable[[Callable[..., Credit]], Callable[..., Credit]]:
    """Register `fn` under `name`. `needs` lists the optional `RolloutBatch` fields the estimator reads."""
    unknown = [n for n in needs if n not in FIELDS]
    if unknown:
        raise ValueError(f"estimator {name!r} declares unknown batch field(s) {unknown}; "
                         f"known fields: {sorted(FIELDS)}")

    def register(fn: Callable[..., Credit]) -> Callable[..., Credit]:
        if name in _REGISTRY:
            raise ValueError(f"an estimator named {name!r} is already registered "
                             f"(by {_REGISTRY[name].raw.__module__}); registered: {list_estimators()}")

        @functools.wraps(fn)
        def checked(batch: RolloutBatch, **hyperparams: Any) -> Credit:
            check_needs(name, needs, batch)
            with torch.no_grad():
                credit = fn(batch, **hyperparams)
            _check_output(name, batch, credit)
            return credit

        checked.raw = fn  # type: ignore[attr-defined]
        checked.needs = tuple(needs)  # type: ignore[attr-defined]
        _REGISTRY[name] = EstimatorSpec(name=name, needs=tuple(needs), fn=checked, raw=fn)
        return checked

    return register


def check_needs(name: str, needs: tuple[str, ...], batch: RolloutBatch) -> None:
    """Validate the batch, then require every field in `needs` (error names the field and its producer)."""
    if not isinstance(batch, RolloutBatch):
        raise TypeError(f"estimator {name!r} takes a RolloutBatch, got {type(batch).__name__}")
    batch.validate()
    for field_name in needs:
        if getattr(batch, field_name) is None:
            spec = FIELDS[field_name]
            raise ValueError(f"estimator {name!r} needs RolloutBatch.{field_name} "
                             f"[{','.join(spec.shape)}] ({spec.doc}); it is produced by {spec.producer}")


def _check_output(name: str, batch: RolloutBatch, credit: Credit) -> None:
    if not isinstance(credit, Credit):
        raise TypeError(f"estimator {name!r} returned {type(credit).__name__}, not Credit")
    for label, t in (("advantages", credit.advantages), ("returns", credit.returns)):
        if t is None:
            continue
        if tuple(t.shape) != tuple(batch.response_ids.shape):
            raise RuntimeError(f"estimator {name!r} returned {label} of shape {tuple(t.shape)}, "
                               f"expected {tuple(batch.response_ids.shape)}")
        if not bool(torch.isfinite(t).all()):
            raise RuntimeError(f"estimator {name!r} produced non-finite {label} (a bug: please report it)")
        if bool((t[~batch.response_mask] != 0).any()):
            raise RuntimeError(f"estimator {name!r} produced nonzero {label} outside response_mask")


def get_estimator(name: str) -> Callable[..., Credit]:
    """The checked estimator registered under `name`."""
    return get_spec(name).fn


def get_spec(name: str) -> EstimatorSpec:
    _load_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown estimator {name!r}; registered estimators: {list_estimators()}") from None


def list_estimators() -> list[str]:
    """Sorted names of every registered estimator."""
    _load_builtin()
    return sorted(_REGISTRY)


def _load_builtin() -> None:
    # Importing the credit package registers the built-in estimators (idempotent).
    import creditlab.credit  # noqa: F401
