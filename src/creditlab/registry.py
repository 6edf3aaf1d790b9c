"""The estimator registry: one dict, one decorator, no bypass.

    @estimator("grpo", ranges={"eps": "[0, inf)"})
    def grpo(batch: RolloutBatch, *, eps: float = 1e-6, singleton: Literal["zero", "raw"] = "zero") -> Credit: ...

`estimator(...)` returns a *checked* callable. Every call (through `get_estimator(name)` or by importing the
function) does, in order:

1. **Hyper-parameters**: an unknown keyword, a value of the wrong type or a value outside its
   declared range raises a one-line `ValueError` naming the estimator and the parameter. Types come from the
   estimator's own keyword annotations: `bool` must be a real bool (not the string "false", not 1), `float` a
   finite real number (an int is fine, a bool or NaN is not), `int` an int32 integer, `Literal[...]` one of its
   choices, `tuple[int, ...]` a list/tuple of integers, `X | None` also None. Ranges are declared per estimator
   in interval notation (`ranges={"alpha": "[0, 1)"}`); checks that tie parameters together stay in the body.
2. **Batch**: `batch.validate()` and the declared `needs` (a missing field names itself and its producer).
3. **T = 0**: a batch with no token columns has nothing to credit; the result is advantages of shape [B, 0]
   (defined and empty) and the estimator's math is not called.
4. The estimator runs under `torch.no_grad()`; its output must have shape [B,T], be finite and exactly 0
   outside `response_mask`. A non-finite output from inputs of ordinary size is a bug (please report it); from
   very large inputs or hyper-parameters it is a float32 overflow and the error names the largest of them.

The unchecked function is kept as `.raw` for tests that want to probe the math alone.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import torch

from creditlab.batch import FIELDS, Credit, RolloutBatch

# Above this magnitude an input or a hyper-parameter counts as large: a non-finite output is then reported as a
# float32 overflow that names it (a ValueError), not as a bug.
_LARGE = 100.0


class EstimatorFn(Protocol):
    def __call__(self, batch: RolloutBatch, **hyperparams: Any) -> Credit: ...


# ------------------------------------------------------------------------------------ hyper-parameter checks
Kind = Literal["float", "int", "bool", "str", "choice", "int_tuple", "unchecked"]
_INTERVAL = re.compile(r"\s*([\[(])\s*([^,\s]+)\s*,\s*([^,\s\])]+)\s*([\])])\s*")


@dataclass(frozen=True)
class Interval:
    """A real interval in the usual notation: "[0, 1)", "(0, inf)", "(-inf, inf)"."""

    lo: float
    hi: float
    lo_closed: bool
    hi_closed: bool

    @classmethod
    def parse(cls, text: str) -> Interval:
        m = _INTERVAL.fullmatch(text)
        try:
            lo, hi = float(m.group(2)), float(m.group(3))  # type: ignore[union-attr]
        except (AttributeError, ValueError):
            raise ValueError(f"range {text!r} is not an interval such as '[0, 1)' or '(0, inf)'") from None
        if math.isnan(lo) or math.isnan(hi) or lo > hi:
            raise ValueError(f"range {text!r} is empty")
        return cls(lo, hi, m.group(1) == "[", m.group(4) == "]")

    def __contains__(self, x: float) -> bool:
        above = x >= self.lo if self.lo_closed else x > self.lo
        below = x <= self.hi if self.hi_closed else x < self.hi
        return above and below

    def __str__(self) -> str:
        def fmt(v: float) -> str:
            return ("-inf" if v < 0 else "inf") if math.isinf(v) else f"{v:g}"
        return f"{'[' if self.lo_closed else '('}{fmt(self.lo)}, {fmt(self.hi)}{']' if self.hi_closed else ')'}"


def _show(value: Any) -> str:
    text = repr(value)
    return f"{text[:60]}{'...' if len(text) > 60 else ''} ({type(value).__name__})"


def _is_bool(value: Any) -> bool:
    return isinstance(value, (bool, np.bool_))


_INT_LIMIT = 2**31  # integer hyper-parameters (lengths, depths, ids) stay int32: tensor arithmetic cannot overflow


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not _is_bool(value) and -_INT_LIMIT <= value < _INT_LIMIT


@dataclass(frozen=True)
class HyperParam:
    """What one estimator keyword accepts: its kind (from the annotation), None or not, choices, a range."""

    name: str
    kind: Kind
    optional: bool = False
    choices: tuple[Any, ...] = ()
    interval: Interval | None = None
    default: Any = None
    has_default: bool = False

    def describe(self) -> str:
        what = {"float": "a finite real number", "int": "an int32 integer", "bool": "a bool (True or False)",
                "str": "a string", "int_tuple": "a list or tuple of int32 integers", "unchecked": "any value",
                "choice": f"one of {list(self.choices)}"}[self.kind]
        if self.interval is not None and self.kind in ("float", "int"):
            what += f" in {self.interval}"
        elif self.interval is not None:
            what += f" (each in {self.interval})"
        return what + (" or None" if self.optional else "")

    def check(self, estimator_name: str, value: Any) -> None:
        """Raise a one-line ValueError naming the estimator and this parameter if `value` is not acceptable."""
        if (value is None and self.optional) or self.kind == "unchecked" or self._accepts(value):
            return
        raise ValueError(f"estimator {estimator_name!r}: hyper-parameter {self.name!r} must be {self.describe()}, "
                         f"got {_show(value)}")

    def _accepts(self, value: Any) -> bool:
        if self.kind == "bool":
            return _is_bool(value)
        if self.kind == "str":
            return isinstance(value, str)
        if self.kind == "choice":
            return any(type(value) is type(c) and value == c for c in self.choices)
        if self.kind == "int_tuple":
            return isinstance(value, (tuple, list)) and all(_is_int(v) and self._in_range(v) for v in value)
        if self.kind == "int":
            return _is_int(value) and self._in_range(value)
        # float: any real number but a bool, finite (an int too large for a float is not)
        if not isinstance(value, numbers.Real) or _is_bool(value):
            return False
        try:
            return math.isfinite(float(value)) and self._in_range(value)
        except OverflowError:
            return False

    def _in_range(self, value: Any) -> bool:
        return self.interval is None or value in self.interval  # exact comparison, also for huge ints


def _kind_of(annotation: Any) -> tuple[Kind, bool, tuple[Any, ...]]:
    """(kind, optional, choices) of a resolved annotation; "unchecked" for anything this registry cannot check."""
    optional = False
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1 or len(args) != 2:
            return "unchecked", False, ()
        optional, annotation = True, rest[0]
    origin = typing.get_origin(annotation)
    simple: dict[Any, Kind] = {bool: "bool", float: "float", int: "int", str: "str"}
    if annotation in simple:
        return simple[annotation], optional, ()
    if origin is Literal:
        return "choice", optional, typing.get_args(annotation)
    if origin is tuple and typing.get_args(annotation)[1:] == (Ellipsis,) and typing.get_args(annotation)[0] is int:
        return "int_tuple", optional, ()
    return "unchecked", optional, ()


def hyperparams_of(name: str, fn: Callable[..., Any], ranges: Mapping[str, str]) -> dict[str, HyperParam]:
    """The checks of every keyword of `fn` after the batch, from its annotations and the declared `ranges`.

    Raises at registration when a range names an unknown or non-numeric parameter, or a default fails its check.
    """
    hints = typing.get_type_hints(fn)
    sig = list(inspect.signature(fn).parameters.values())[1:]  # the batch comes first
    params: dict[str, HyperParam] = {}
    for p in sig:
        if p.kind in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL):
            continue
        kind, optional, choices = _kind_of(hints.get(p.name, Any))
        interval = None
        if p.name in ranges:
            if kind not in ("float", "int", "int_tuple"):
                raise ValueError(f"estimator {name!r}: a range is declared for {p.name!r}, which is not numeric")
            interval = Interval.parse(ranges[p.name])
        has_default = p.default is not inspect.Parameter.empty
        params[p.name] = HyperParam(p.name, kind, optional, choices, interval,
                                    p.default if has_default else None, has_default)
        if has_default:
            params[p.name].check(name, p.default)  # a default outside its own range is a bug in the estimator
    extra = sorted(set(ranges) - set(params))
    if extra:
        raise ValueError(f"estimator {name!r} declares ranges for unknown hyper-parameter(s) {extra}")
    return params


@dataclass(frozen=True)
class EstimatorSpec:
    """A registered estimator: its name, the batch fields it reads beyond the required ones, its function and the
    checks on its hyper-parameters."""

    name: str
    needs: tuple[str, ...]
    fn: Callable[..., Credit]  # the checked callable
    raw: Callable[..., Credit]  # the bare math
    params: Mapping[str, HyperParam]  # keyword -> type/range check (from the annotations and `ranges`)

    @property
    def summary(self) -> str:
        doc = inspect.getdoc(self.raw) or ""
        return doc.splitlines()[0] if doc else ""

    @property
    def defaults(self) -> dict[str, Any]:
        return {k: p.default for k, p in self.params.items() if p.has_default}


_REGISTRY: dict[str, EstimatorSpec] = {}


def estimator(name: str, needs: tuple[str, ...] = (),
              ranges: Mapping[str, str] | None = None) -> Callable[[Callable[..., Credit]], Callable[..., Credit]]:
    """Register `fn` under `name`.

    needs:  the optional `RolloutBatch` fields the estimator reads.
    ranges: allowed interval of numeric hyper-parameters, e.g. {"eps": "[0, inf)", "alpha": "[0, 1)"}; for a
            `tuple[int, ...]` parameter the interval applies to each element.
    """
    unknown = [n for n in needs if n not in FIELDS]
    if unknown:
        raise ValueError(f"estimator {name!r} declares unknown batch field(s) {unknown}; "
                         f"known fields: {sorted(FIELDS)}")

    def register(fn: Callable[..., Credit]) -> Callable[..., Credit]:
        if name in _REGISTRY:
            raise ValueError(f"an estimator named {name!r} is already registered "
                             f"(by {_REGISTRY[name].raw.__module__}); registered: {list_estimators()}")
        params = hyperparams_of(name, fn, ranges or {})

        @functools.wraps(fn)
        def checked(batch: RolloutBatch, **hyperparams: Any) -> Credit:
            check_hyperparams(name, params, hyperparams)
            check_needs(name, needs, batch)
            if batch.T == 0:  # no token columns: a defined, empty result
                adv = torch.zeros(batch.B, 0, dtype=torch.float32, device=batch.response_ids.device)
                return Credit(advantages=adv)
            with torch.no_grad():
                credit = fn(batch, **hyperparams)
            _check_output(name, batch, credit, hyperparams)
            return credit

        checked.raw = fn  # type: ignore[attr-defined]
        checked.needs = tuple(needs)  # type: ignore[attr-defined]
        _REGISTRY[name] = EstimatorSpec(name=name, needs=tuple(needs), fn=checked, raw=fn, params=params)
        return checked

    return register


def check_hyperparams(name: str, params: Mapping[str, HyperParam], given: Mapping[str, Any]) -> None:
    """Raise a one-line ValueError for an unknown keyword or a value of the wrong type / out of range."""
    for key, value in given.items():
        if key not in params:
            raise ValueError(f"estimator {name!r} has no hyper-parameter {key!r}; "
                             f"its hyper-parameters: {sorted(params)}")
        params[key].check(name, value)


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


def _check_output(name: str, batch: RolloutBatch, credit: Credit, hyperparams: Mapping[str, Any]) -> None:
    if not isinstance(credit, Credit):
        raise TypeError(f"estimator {name!r} returned {type(credit).__name__}, not Credit")
    for label, t in (("advantages", credit.advantages), ("returns", credit.returns)):
        if t is None:
            continue
        if tuple(t.shape) != tuple(batch.response_ids.shape):
            raise RuntimeError(f"estimator {name!r} returned {label} of shape {tuple(t.shape)}, "
                               f"expected {tuple(batch.response_ids.shape)}")
        if not bool(torch.isfinite(t).all()):
            _raise_non_finite(name, label, batch, hyperparams)
        if bool((t[~batch.response_mask] != 0).any()):
            raise RuntimeError(f"estimator {name!r} produced nonzero {label} outside response_mask")


def _raise_non_finite(name: str, label: str, batch: RolloutBatch, hyperparams: Mapping[str, Any]) -> None:
    """Name the largest input and hyper-parameter; blame them (ValueError) when one is large, else report a bug."""
    fields = [(float(t.detach().abs().max()), f"RolloutBatch.{f}") for f, spec in FIELDS.items()
              if spec.kind == "float" and isinstance(t := getattr(batch, f), torch.Tensor) and t.numel()]
    params = [(abs(float(v)), f"hyper-parameter {k}") for k, v in hyperparams.items()
              if isinstance(v, numbers.Real) and not _is_bool(v)]
    shown = [f"{what} with |x| = {size:.3g}" for size, what in (max(fields, default=(0.0, "")),
                                                                max(params, default=(0.0, ""))) if what]
    largest = "largest: " + ", ".join(shown) if shown else "no float inputs"
    if max(fields + params, default=(0.0, ""))[0] > _LARGE:
        raise ValueError(f"estimator {name!r} produced non-finite {label}: a float32 overflow from large values "
                         f"({largest}); rescale them (if they are ordinary, this is a bug: please report it)")
    raise RuntimeError(f"estimator {name!r} produced non-finite {label} from finite inputs of ordinary size "
                       f"({largest}; a bug: please report it)")


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
