"""Every registered estimator validates its hyper-parameters (issue 12, item 8).

Probes are generated from each estimator's own keyword annotations and declared ranges (`registry.HyperParam`),
so estimators registered later are covered automatically: NaN / inf / -inf, a string or a bool for a number, a
string or an int for a bool, an unknown `Literal` choice, an unknown keyword, and a value just outside the declared
range (or -1 where no range is declared: the estimator must then reject it itself). Each must end in a one-line
ValueError that names the parameter. Values at the edges of each range must give finite credit or a one-line
ValueError (a cross-parameter rule, or a named float32 overflow), never a crash or "a bug: please report it".
"""

import math

import pytest
import torch

from creditlab import get_estimator, list_estimators
from creditlab.registry import get_spec
from creditlab.sample import random_batch

BATCH = random_batch(n_groups=3, max_group=4, T=6, seed=0, empty_row_prob=0.0)


def _bad_values(p):
    """(label, value) pairs that `p` must reject."""
    if p.kind == "float":
        out = [("nan", math.nan), ("inf", math.inf), ("-inf", -math.inf), ("str", "0.5"), ("bool", True),
               ("int-too-big-for-float", 10**400)]
    elif p.kind == "int":
        out = [("float", 1.5), ("str", "3"), ("bool", True), ("huge", 10**30)]
    elif p.kind == "bool":
        out = [("str-false", "false"), ("int-1", 1), ("int-0", 0)] + ([] if p.optional else [("none", None)])
    elif p.kind == "choice":
        out = [("unknown-choice", "bogus_choice"), ("int", 1)]
    elif p.kind == "int_tuple":
        out = [("str", "1,2"), ("float-item", (1.5,)), ("bool-item", (True,))]
    elif p.kind == "str":
        out = [("int", 3)]
    else:
        out = []
    if p.kind in ("float", "int", "int_tuple"):
        out += _outside(p)
    return out


def _outside(p):
    """Values just outside the declared interval; -1 when the estimator declares none (it must check itself)."""
    wrap = (lambda v: (v,)) if p.kind == "int_tuple" else (lambda v: v)
    cast = int if p.kind in ("int", "int_tuple") else float
    iv = p.interval
    if iv is None:
        return [("negative-undeclared", wrap(cast(-1)))]
    out = []
    if math.isfinite(iv.lo):
        out.append(("below", wrap(cast(iv.lo - 1))))
        if not iv.lo_closed:
            out.append(("at-open-lo", wrap(cast(iv.lo))))
    if math.isfinite(iv.hi):
        out.append(("above", wrap(cast(iv.hi + 1))))
        if not iv.hi_closed:
            out.append(("at-open-hi", wrap(cast(iv.hi))))
    return out


def _edge_values(p):
    """Values inside the declared interval at its edges (1e6 stands for an unbounded side)."""
    if p.kind not in ("float", "int") or p.interval is None:
        return []
    iv, step = p.interval, (1 if p.kind == "int" else 1e-6)
    lo = iv.lo if iv.lo_closed else iv.lo + step
    hi = iv.hi if iv.hi_closed else iv.hi - step
    vals = [-1e6 if math.isinf(iv.lo) else lo, 1e6 if math.isinf(iv.hi) else hi]
    return [int(v) if p.kind == "int" else float(v) for v in vals]


BAD = [(name, key, label, value) for name in list_estimators()
       for key, p in get_spec(name).params.items() for label, value in _bad_values(p)]
EDGE = [(name, key, value) for name in list_estimators()
        for key, p in get_spec(name).params.items() for value in _edge_values(p)]


@pytest.mark.parametrize("name,key,label,value", BAD, ids=[f"{n}-{k}-{lab}" for n, k, lab, _ in BAD])
def test_bad_hyperparameter_is_a_one_line_error_naming_it(name, key, label, value):
    with pytest.raises(ValueError) as e:
        get_estimator(name)(BATCH, **{key: value})
    msg = str(e.value)
    assert key in msg and "\n" not in msg, msg
    assert "report" not in msg, msg


@pytest.mark.parametrize("name", list_estimators())
def test_unknown_keyword_is_named(name):
    with pytest.raises(ValueError, match=rf"'{name}' has no hyper-parameter 'definitely_not_a_param'"):
        get_estimator(name)(BATCH, definitely_not_a_param=1)


@pytest.mark.parametrize("name,key,value", EDGE, ids=[f"{n}-{k}-{v}" for n, k, v in EDGE])
def test_edge_of_range_gives_finite_credit_or_a_named_error(name, key, value):
    try:
        credit = get_estimator(name)(BATCH, **{key: value})
    except ValueError as e:  # a rule tying two parameters together, or a named float32 overflow
        assert "\n" not in str(e) and (key in str(e) or "overflow" in str(e)), str(e)
        return
    assert torch.isfinite(credit.advantages).all()


@pytest.mark.parametrize("name", list_estimators())
def test_every_hyperparameter_is_annotated_precisely(name):
    # float, int, bool, str, Literal[...], tuple[int, ...] or X | None: the registry can check nothing else
    unchecked = [k for k, p in get_spec(name).params.items() if p.kind == "unchecked"]
    assert not unchecked, f"{name}: annotate {unchecked} as float, int, bool, Literal[...] or tuple[int, ...]"


@pytest.mark.parametrize("name", list_estimators())
def test_defaults_and_json_style_values_pass(name):
    spec = get_spec(name)
    get_estimator(name)(BATCH, **spec.defaults)  # every default passes its own check
    ints = {k: int(v) for k, v in spec.defaults.items()  # JSON gives 1 for 1.0: an int is a fine float
            if spec.params[k].kind == "float" and v is not None and float(v).is_integer() and abs(v) < 1e9}
    try:
        get_estimator(name)(BATCH, **ints)
    except ValueError as e:  # only a cross-parameter rule may object, and it names a parameter
        assert any(k in str(e) for k in ints), str(e)


def test_issue_12_examples():
    b = BATCH
    with pytest.raises(ValueError, match=r"'grpo': hyper-parameter 'eps' must be a finite real number in \[0, inf\)"):
        get_estimator("grpo")(b, eps=-1)  # used to flip every advantage's sign
    with pytest.raises(ValueError, match="'eps'"):
        get_estimator("grpo")(b, eps=-math.inf)  # used to zero every advantage
    with pytest.raises(ValueError, match=r"'whiten' must be a bool \(True or False\), got 'false' \(str\)"):
        get_estimator("treepo")(b, whiten="false")  # used to behave as True
    with pytest.raises(ValueError, match="'td_coef' must be a finite real number"):
        get_estimator("tempo")(b, td_coef=math.nan)  # used to surface as "a bug: please report it"
    with pytest.raises(ValueError, match=r"'mode' must be one of \['softmin', 'strict'\]"):
        get_estimator("pure")(b, mode="min")
    get_estimator("treepo")(b, max_depth=None)  # X | None accepts None
    get_estimator("ktae")(b, ignore_token_ids=[1, 2])  # a JSON list is a fine tuple
    torch.testing.assert_close(get_estimator("grpo")(b, eps=1).advantages,  # an int for a float
                               get_estimator("grpo")(b, eps=1.0).advantages)
