"""reasoning-gym families behind one adapter: ``GymTask("chain_sum", digits=1, terms=2)``.

Each reasoning-gym dataset brings its own generator and answer checker; this adapter only
  * rewrites the prompt to end with one answer instruction ("End your reply with 'The answer is N.'"),
  * extracts the answer from that line (numeric families fall back to the last number in the response),
  * calls the dataset's own ``score_answer`` and counts only a full score (1.0) as correct. reasoning-gym gives
    partial scores to wrong answers (e.g. ``countdown`` 0.05 for a well-formed wrong expression, ``chain_sum``
    a length ratio when the gold digits appear inside the answer); they become the reward only with
    ``partial_credit=True``.

Splits: train and test draw from reasoning-gym with different derived seeds, and each problem is kept only in the
split its canonical key hashes to (``split_of``). So the splits are disjoint even in tiny spaces (one-digit
two-term sums have 200 distinct questions), at the price of repeats within a split when ``n`` exceeds its share.

Config keyword arguments pass through to ``reasoning_gym.create_dataset``. Shorthands (``digits=1`` for
``min_digits=max_digits=1``, ``terms=2`` for ``min_terms=max_terms=2``, ``numbers=3`` likewise) expand first.
Oracle step labels are not known for these tasks (``step_labels=None``).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from creditlab.tasks.base import (
    ANSWER_INSTRUCTION,
    ZERO,
    Problem,
    Score,
    check_split,
    extract_final_answer,
    extract_numeric_answer,
    max_draws,
    split_of,
)

_SHORTHANDS = {"digits": ("min_digits", "max_digits"), "terms": ("min_terms", "max_terms"),
               "numbers": ("min_numbers", "max_numbers")}
# countdown answers are passed to sympy's parse_expr (which evals): admit plain integer arithmetic only.
_SAFE_EXPRESSION = re.compile(r"[\d\s+\-*/()]{1,100}")


def _countdown_key(entry: dict[str, Any]) -> str:
    meta = entry["metadata"]
    return repr((sorted(meta["numbers"]), meta["target"]))


def _expression_key(entry: dict[str, Any]) -> str:
    return str(entry["metadata"].get("expression", entry["question"]))


def _countdown_prompt(entry: dict[str, Any]) -> str:
    meta = entry["metadata"]
    numbers = ", ".join(map(str, meta["numbers"]))
    return (f"Using all the numbers {numbers}, create an expression that equals {meta['target']}. Use each number "
            f"once, with + - * / and parentheses. End your reply with 'The answer is EXPRESSION.'")


def _gsm_demonstration(entry: dict[str, Any]) -> str:
    cot = entry["metadata"].get("answer_cot", "")
    lines = [line for line in cot.splitlines() if not line.startswith("####")]
    return "\n".join([*lines, f"The answer is {entry['answer']}."]).strip()


def _expression_demonstration(entry: dict[str, Any]) -> str:
    expression = entry["metadata"].get("expression")
    worked = f"{expression} = {entry['answer']}\n" if expression else ""
    return f"{worked}The answer is {entry['answer']}."


@dataclass(frozen=True)
class Family:
    """How the adapter treats one reasoning-gym dataset (defaults suit numeric-answer datasets).

    numeric: extract a number (with last-number fallback) rather than the raw answer text.
    key: the canonical problem identity used for the split hash.
    prompt: builds the prompt from the entry (default: the question plus ``ANSWER_INSTRUCTION``).
    demonstration: a correct response for the entry.
    valid: a filter on the extracted answer before it reaches the dataset's scorer.
    """

    numeric: bool = True
    key: Callable[[dict[str, Any]], str] = lambda entry: entry["question"]
    prompt: Callable[[dict[str, Any]], str] | None = None
    demonstration: Callable[[dict[str, Any]], str] = lambda entry: f"The answer is {entry['answer']}."
    valid: Callable[[str], bool] = lambda answer: True


FAMILIES: dict[str, Family] = {
    "chain_sum": Family(key=_expression_key, demonstration=_expression_demonstration),
    "basic_arithmetic": Family(key=_expression_key, demonstration=_expression_demonstration),
    "countdown": Family(numeric=False, key=_countdown_key, prompt=_countdown_prompt,
                        valid=lambda answer: _SAFE_EXPRESSION.fullmatch(answer) is not None and "**" not in answer),
    "gsm_symbolic": Family(demonstration=_gsm_demonstration),
}


def expand_shorthands(options: dict[str, Any]) -> dict[str, Any]:
    """``digits=1`` -> ``min_digits=1, max_digits=1`` (likewise ``terms``, ``numbers``); other keys unchanged."""
    out: dict[str, Any] = {}
    for key, value in options.items():
        if key in _SHORTHANDS:
            low, high = _SHORTHANDS[key]
            out[low], out[high] = value, value
        else:
            out[key] = value
    return out


def _derived_seed(split: str, seed: int) -> int:
    digest = hashlib.blake2b(f"gym:{split}:{seed}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big") % (2**31)


class GymTask:
    """A reasoning-gym dataset as a creditlab ``Task``.

    Args:
        dataset: the reasoning-gym dataset name (``reasoning_gym.factory.DATASETS``).
        test_fraction: share of the problem space (by stable hash of the canonical key) reserved for test.
        partial_credit: use reasoning-gym's graded score as the reward (default: 1 if fully correct else 0).
        **config: reasoning-gym config fields (``seed`` and ``size`` are set by ``problems``).
    """

    def __init__(self, dataset: str, *, test_fraction: float = 0.2, partial_credit: bool = False,
                 **config: Any) -> None:
        import reasoning_gym  # noqa: F401  (registers the datasets)
        from reasoning_gym.factory import DATASETS

        if dataset not in DATASETS:
            raise KeyError(f"unknown reasoning-gym dataset {dataset!r}; valid: {sorted(DATASETS)}")
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"need 0 < test_fraction < 1, got {test_fraction}")
        self.name = dataset if dataset in FAMILIES else f"gym:{dataset}"
        self.dataset = dataset
        self.family = FAMILIES.get(dataset, Family(numeric=False))
        self.config = expand_shorthands(config)
        self.test_fraction, self.partial_credit = test_fraction, partial_credit
        self._scorer = self._create(seed=0, size=1)  # validates the config now, not at the first problems() call

    def _create(self, seed: int, size: int) -> Any:
        import reasoning_gym

        return reasoning_gym.create_dataset(self.dataset, **{**self.config, "seed": seed, "size": size})

    def _problem(self, entry: dict[str, Any]) -> Problem:
        if self.family.prompt is not None:
            prompt = self.family.prompt(entry)
        else:
            prompt = f"{entry['question'].rstrip()}\n{ANSWER_INSTRUCTION}"
        return Problem(prompt=prompt, answer=str(entry["answer"]), meta={"dataset": self.dataset, "entry": entry})

    def problems(self, split: str, n: int, seed: int) -> list[Problem]:
        """``n`` problems whose canonical key hashes to ``split``, generated from a split-specific seed."""
        check_split(split)
        budget = max_draws(n)
        source = self._create(seed=_derived_seed(split, seed), size=budget)
        out: list[Problem] = []
        for idx in range(budget):
            if len(out) == n:
                return out
            entry = source[idx]
            if split_of(f"{self.dataset}:{self.family.key(entry)}", self.test_fraction) == split:
                out.append(self._problem(entry))
        if len(out) < n:
            raise ValueError(f"{self.name}: could not draw {n} {split} problems; the problem space is too small")
        return out

    def extract(self, response: str) -> str | None:
        """The answer the scorer sees, or None if the response has no usable answer."""
        answer = extract_numeric_answer(response) if self.family.numeric else extract_final_answer(response)
        if answer is None or not self.family.valid(answer):
            return None
        return answer

    def score(self, problem: Problem, response: str) -> Score:
        """The dataset's own ``score_answer`` on the extracted answer; only a full score counts as correct."""
        if not isinstance(response, str):
            return ZERO
        answer = self.extract(response)
        if answer is None:
            return ZERO
        try:
            raw = float(self._scorer.score_answer(answer, problem.meta["entry"]))
        except Exception:  # a third-party checker choking on model text must not stop training
            return ZERO
        correct = raw >= 1.0 - 1e-9
        reward = min(max(raw, 0.0), 1.0) if self.partial_credit else float(correct)
        return Score(reward=reward, correct=correct)

    def demonstration(self, problem: Problem) -> str:
        """A correct response: worked line(s) where the entry has them, then "The answer is X."."""
        return self.family.demonstration(problem.meta["entry"])
