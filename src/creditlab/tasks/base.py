"""The task contract: problems for a split, and a scorer that returns outcome reward and oracle step labels.

Every task answers two questions:
  * ``problems(split, n, seed)``: which prompts to train or evaluate on. Train and test are disjoint and the list
    is a pure function of ``(split, n, seed)`` and the task options.
  * ``score(problem, response)``: how good the response text is — an outcome reward in ``[0, 1]``, whether it
    counts as solved, and where the task can know them, oracle per-step labels with their character spans.

Scorers never raise on model output: empty, malformed or adversarial text scores 0.

This module also holds the small helpers the tasks share: a process-stable hash for train/test splitting and the
"The answer is N." extractor used by the natural-language tasks.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

SPLITS = ("train", "test")

# One instruction for every natural-language task, so that a policy learns a single answer format.
ANSWER_INSTRUCTION = "End your reply with 'The answer is N.'"


@dataclass(frozen=True)
class Problem:
    """One prompt with its gold answer.

    Attributes:
        prompt: the user message (plain text; the policy applies its chat template if it has one).
        answer: gold final answer as text.
        meta: task-specific data the scorer needs (e.g. the gold steps, the source dataset entry).
    """

    prompt: str
    answer: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Score:
    """The verdict on one response.

    Attributes:
        reward: outcome reward in [0, 1].
        correct: counts as solved (for accuracy).
        step_labels: oracle per-step correctness (1/0) for the steps found in the response; None if the task
            cannot know. An empty tuple means the task knows and found no steps.
        first_error: index of the first wrong step; None if every found step is right, or unknown.
        step_spans: character spans ``[start, end)`` of each step in the response text, aligned with step_labels.
    """

    reward: float
    correct: bool
    step_labels: tuple[int, ...] | None = None
    first_error: int | None = None
    step_spans: tuple[tuple[int, int], ...] | None = None


ZERO = Score(reward=0.0, correct=False)


@runtime_checkable
class Task(Protocol):
    """What the trainer, benchmark and CLI need from a task."""

    name: str

    def problems(self, split: str, n: int, seed: int) -> list[Problem]:
        """``n`` problems of ``split`` ("train" or "test"); splits are disjoint, the list is deterministic."""
        ...

    def score(self, problem: Problem, response: str) -> Score:
        """Score a response; never raises on malformed text (it scores 0)."""
        ...

    def demonstration(self, problem: Problem) -> str:
        """A correct response in the expected format (SFT warm-start); NotImplementedError if the task has none."""
        ...


def check_split(split: str) -> None:
    """Raise ValueError for a split name other than "train" / "test"."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def stable_hash(key: str) -> int:
    """A 64-bit hash of ``key`` that is the same in every process (``hash()`` is salted per process)."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "big")


def split_of(key: str, test_fraction: float) -> str:
    """Assign a problem to "train" or "test" by a stable hash of its canonical key.

    Hashing the problem itself (not the seed or the index) makes the splits disjoint however many problems are
    drawn, and keeps them disjoint in small problem spaces where seed-offset schemes would collide.
    """
    bucket = stable_hash(key) % 1_000_000
    return "test" if bucket < test_fraction * 1_000_000 else "train"


def max_draws(n: int) -> int:
    """How many candidates a rejection sampler may draw for ``n`` accepted problems before giving up."""
    return 200 * n + 10_000


# "The answer is X" — case-insensitive, optional colon, X up to the end of the line.
_ANSWER_RE = re.compile(r"the answer is\s*:?\s*([^\n]*)", re.IGNORECASE)
_NUMBER_RE = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?")
_MAX_ANSWER_CHARS = 200


def extract_final_answer(response: str) -> str | None:
    """The text after the last "The answer is", without wrapping markup and the closing period; None if absent."""
    matches = _ANSWER_RE.findall(response)
    if not matches:
        return None
    text = matches[-1].strip()
    text = text.strip("*`$ ").rstrip(".").strip("*`$ ")
    if not text or len(text) > _MAX_ANSWER_CHARS:
        return None
    return text


def extract_number(text: str, last: bool = False) -> str | None:
    """The first (or last) number in ``text`` with thousands separators removed; None if there is none."""
    found = _NUMBER_RE.findall(text)
    if not found:
        return None
    number = (found[-1] if last else found[0]).replace(",", "").rstrip(".")
    return number.lstrip("+") or None


def extract_numeric_answer(response: str) -> str | None:
    """The number in the "The answer is N." line; falls back to the last number of the response."""
    final = extract_final_answer(response)
    if final is not None:
        number = extract_number(final)
        if number is not None:
            return number
    return extract_number(response, last=True)
