"""Checks of the names a run is configured with (task, estimator, scorer, policy, output directory) and of their
keyword JSON, run by the config sections' `validate()` before any work. Each raises a one-line `ValueError` that
names the CLI option; a misspelt keyword is reported with the valid ones.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any


def keyword_names(fn: Callable[..., Any], skip: int = 0) -> list[str] | None:
    """The keyword names `fn` accepts (after its first `skip` positional parameters); None if it takes **kwargs."""
    params = list(inspect.signature(fn).parameters.values())[skip:]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    named = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in params if p.kind in named]


def check_keys(kwargs: dict[str, Any], fn: Callable[..., Any], flag: str, what: str, skip: int = 0) -> None:
    """Refuse keys of `kwargs` that `fn` does not take, listing the ones it does, and values whose type does not
    match a simple annotation (bool, int, float, str, a Literal, optionally None)."""
    valid = keyword_names(fn, skip)
    unknown = sorted(set(kwargs) - set(valid)) if valid is not None else []
    if unknown:
        raise ValueError(f"{flag}: {what} has no option {', '.join(map(repr, unknown))}; valid: {sorted(valid)}")
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # an annotation that does not resolve: leave the value to the callee
        return
    for key, value in kwargs.items():
        if key in hints and not _fits(value, hints[key]):
            raise ValueError(f"{flag}: {what} option {key!r} must be {_describe(hints[key])}, got {value!r}")


_SIMPLE = (bool, int, float, str)


def _fits(value: Any, tp: Any) -> bool:
    """Whether a JSON value fits a simple annotation; True for annotations this check does not understand."""
    if typing.get_origin(tp) is typing.Literal:
        return value in typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if not all(a is type(None) or a in _SIMPLE or typing.get_origin(a) is typing.Literal for a in args):
            return True
        return any(_fits(value, a) for a in args)
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp in (bool, str):
        return isinstance(value, tp)
    return True


def _describe(tp: Any) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return f"one of {list(typing.get_args(tp))}"
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    return "None" if tp is type(None) else getattr(tp, "__name__", str(tp))


def check_task(name: str, kwargs: dict[str, Any]) -> None:
    from creditlab.tasks import list_tasks

    if name.startswith("gym:"):
        return  # any reasoning-gym dataset: checked when the task is built (reasoning-gym takes **config)
    if name not in list_tasks():
        raise ValueError(f"--task: unknown task {name!r}; valid: {list_tasks()} or 'gym:<reasoning-gym dataset>'")
    from creditlab.tasks import _TASKS

    factory = _TASKS[name]
    target = factory.__init__ if isinstance(factory, type) else factory
    check_keys(kwargs, target, "--task-kwargs", f"task {name!r}", skip=1 if isinstance(factory, type) else 0)


def check_estimator(name: str, kwargs: dict[str, Any]) -> None:
    """Known name; keywords, types and ranges from the registry, then one call on a sample batch (the checks the
    TRL/verl integrations run too), so a bad value fails now, not after the first rollout."""
    from creditlab.integrations._checks import check_estimator_kwargs
    from creditlab.registry import get_spec, list_estimators

    try:
        get_spec(name)
    except KeyError:
        raise ValueError(f"--estimator: unknown estimator {name!r}; registered: {list_estimators()}") from None
    check_estimator_kwargs(name, kwargs, option="--estimator-kwargs")


def check_scorer(name: str, kwargs: dict[str, Any]) -> None:
    from creditlab.signals.prm import _SCORERS, list_scorers

    if not name:
        if kwargs:
            raise ValueError("--scorer-kwargs given without --scorer")
        return
    if name not in list_scorers():
        raise ValueError(f"--scorer: unknown step scorer {name!r}; registered: {list_scorers()}")
    factory = _SCORERS[name]
    target = factory.__init__ if isinstance(factory, type) else factory
    check_keys(kwargs, target, "--scorer-kwargs", f"scorer {name!r}", skip=1 if isinstance(factory, type) else 0)


def check_policy(name: str, flag: str) -> None:
    from creditlab.policy import check_policy_dir, list_policies

    if name in list_policies():
        return
    path = Path(name)
    if not path.is_dir():
        raise ValueError(f"{flag}: unknown policy {name!r}; expected one of {list_policies()} or a local model "
                         "directory")
    try:
        check_policy_dir(path)
    except ValueError as e:
        raise ValueError(f"{flag}: {e}") from None


def check_out_dir(out_dir: str, flag: str) -> None:
    """The directory (or the first of its parents that exists) must be a directory, not a file."""
    if not out_dir:
        return
    path = Path(out_dir)
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                what = "is a file" if p == path else f"is inside {p}, which is a file"
                raise ValueError(f"{flag} {out_dir}: {what}, not a directory")
            return


def one_line(e: BaseException) -> str:
    """An exception's message on one line (KeyError's without its quotes)."""
    msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    return "; ".join(line.strip() for line in str(msg).splitlines() if line.strip()) or type(e).__name__
