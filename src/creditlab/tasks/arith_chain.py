"""arith_chain: procedural multi-step arithmetic with oracle step labels.

A problem is a start value and a chain of operations::

    Compute step by step: start with 7, add 5, multiply by 3, subtract 4.
    Write one step per line as 'a op b = c', then 'Answer: N'.

and the expected response writes one step per line, then the answer::

    7 + 5 = 12
    12 * 3 = 36
    36 - 4 = 32
    Answer: 32

The verifier finds every line of the form ``a op b = c`` (a step) and labels step ``i`` correct iff it is exactly
gold step ``i``: it carries the previous correct result as ``a``, uses the right operation and operand, and its
arithmetic is right. A step that correctly continues from an earlier wrong result is therefore labelled 0 — the
labels say "on the gold path", which is what process-reward credit (first error, min-form) consumes. Steps beyond
the chain's length are wrong. Other lines are ignored.

Values stay in ``[1, max_value]`` by construction (no negative intermediates, division only when exact), and
operands are in ``[1, max_operand]``, so a tiny character-level model can learn the format.
The train/test split is a stable hash of the problem tuple, so the splits are disjoint for any ``n``.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from creditlab.tasks.base import ZERO, Problem, Score, check_split, max_draws, split_of, stable_hash

_WORDS = {"+": "add", "-": "subtract", "*": "multiply by", "/": "divide by"}
# A step line: "a op b = c". Accept the common unicode/letter spellings of * and / so they are judged, not skipped.
_NUM = r"(-?\d{1,12})"
_STEP_RE = re.compile(rf"^[ \t]*{_NUM}[ \t]*([-+*/x×÷])[ \t]*{_NUM}[ \t]*=[ \t]*{_NUM}[ \t]*\.?[ \t\r]*$", re.MULTILINE)
_SYMBOL = {"x": "*", "×": "*", "÷": "/"}
_ANSWER_RE = re.compile(r"answer[ \t]*:[ \t]*(-?\d{1,12})(?!\d)", re.IGNORECASE)

Step = tuple[int, str, int, int]  # (a, op, b, c)


def apply_op(a: int, op: str, b: int) -> int | None:
    """``a op b`` for integers; None for a division that is not exact (or by zero)."""
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if b == 0 or a % b:
        return None
    return a // b


@dataclass(frozen=True)
class ParsedResponse:
    """The step lines and final answer found in a response."""

    steps: tuple[Step, ...]
    spans: tuple[tuple[int, int], ...]
    answer: int | None


def parse_response(response: str) -> ParsedResponse:
    """Find the ``a op b = c`` lines (with their character spans) and the last ``Answer: N``."""
    steps: list[Step] = []
    spans: list[tuple[int, int]] = []
    for m in _STEP_RE.finditer(response):
        op = _SYMBOL.get(m.group(2), m.group(2))
        steps.append((int(m.group(1)), op, int(m.group(3)), int(m.group(4))))
        line = m.group(0)
        start = m.start() + (len(line) - len(line.lstrip()))
        spans.append((start, m.start() + len(line.rstrip())))
    answers = _ANSWER_RE.findall(response)
    return ParsedResponse(tuple(steps), tuple(spans), int(answers[-1]) if answers else None)


def label_steps(found: tuple[Step, ...], gold: tuple[Step, ...]) -> tuple[int, ...]:
    """1 where found step ``i`` is gold step ``i`` (right carry, op, operand and result), else 0."""
    return tuple(int(i < len(gold) and step == gold[i]) for i, step in enumerate(found))


class ArithChain:
    """Procedural chains of ``n_steps`` integer operations with an exact step verifier.

    Args:
        n_steps: operations per problem.
        max_operand: operands (and the start value) are drawn from ``[1, max_operand]``.
        ops: the operations to draw from, any of ``"+-*/"``; division is only drawn when exact.
        max_value: every intermediate value stays in ``[1, max_value]``.
        test_fraction: share of the problem space (by stable hash) reserved for the test split.
        partial_credit: reward for a wrong final answer is ``partial_credit * (gold steps right) / n_steps``;
            0 (the default) gives a pure outcome reward.
        instructions: append the format instruction to the prompt (turn off for a shorter prompt once learned).
        sloppy_demos: share of problems whose *demonstration* (the SFT target, never the verifier) ends with a
            slip: the answer line repeats the previous value (the previous step's result, or the start value
            for one-step chains) instead of the final result. Which problems get the slip is a stable hash of
            the problem, so this is a fixed, flawed demonstration set; a warm-start on it learns a systematic
            error that sampling sometimes avoids, which a verifier reward can then unlearn (`make demo`).
    """

    name = "arith_chain"

    def __init__(self, n_steps: int = 3, max_operand: int = 9, ops: str = "+-*", max_value: int = 99,
                 test_fraction: float = 0.2, partial_credit: float = 0.0, instructions: bool = True,
                 sloppy_demos: float = 0.0) -> None:
        if n_steps < 1 or max_operand < 1 or max_value < max_operand:
            raise ValueError("need n_steps >= 1, max_operand >= 1 and max_value >= max_operand")
        if not ops or set(ops) - set(_WORDS):
            raise ValueError(f"ops must be a non-empty subset of '+-*/', got {ops!r}")
        if not 0.0 < test_fraction < 1.0 or not 0.0 <= partial_credit <= 1.0 or not 0.0 <= sloppy_demos <= 1.0:
            raise ValueError("need 0 < test_fraction < 1, 0 <= partial_credit <= 1 and 0 <= sloppy_demos <= 1")
        self.n_steps, self.max_operand, self.max_value = n_steps, max_operand, max_value
        self.ops = "".join(dict.fromkeys(ops))  # dedupe, keep order: the draw must not depend on repeats
        self.test_fraction, self.partial_credit, self.instructions = test_fraction, partial_credit, instructions
        self.sloppy_demos = sloppy_demos

    # ---- generation ---------------------------------------------------------------------------------------------
    def _operands(self, value: int, op: str) -> list[int]:
        """Operands in ``[1, max_operand]`` that keep the result an integer in ``[1, max_value]``.

        Results stay >= 1 so that no chain collapses to 0 (after which every multiplication is trivial).
        """
        candidates = range(1, self.max_operand + 1)
        return [b for b in candidates if (r := apply_op(value, op, b)) is not None and 1 <= r <= self.max_value]

    def _draw_chain(self, rng: random.Random) -> tuple[Step, ...] | None:
        """One random chain; None when it gets stuck (e.g. ops="-" reaching 1), which the caller redraws."""
        value = rng.randint(1, self.max_operand)
        chain: list[Step] = []
        for _ in range(self.n_steps):
            feasible = [(op, bs) for op in self.ops if (bs := self._operands(value, op))]
            if not feasible:
                return None
            op, operands = rng.choice(feasible)
            b = rng.choice(operands)
            c = apply_op(value, op, b)
            chain.append((value, op, b, c))
            value = c
        return tuple(chain)

    def _prompt(self, chain: tuple[Step, ...]) -> str:
        ops = ", ".join(f"{_WORDS[op]} {b}" for _, op, b, _ in chain)
        prompt = f"Compute step by step: start with {chain[0][0]}, {ops}."
        if self.instructions:
            prompt += " Write one step per line as 'a op b = c', then 'Answer: N'."
        return prompt

    def problems(self, split: str, n: int, seed: int) -> list[Problem]:
        """``n`` problems of ``split``, drawn i.i.d. (repeats possible in tiny spaces) from that split's half."""
        check_split(split)
        rng = random.Random(f"arith_chain:{split}:{seed}")
        out: list[Problem] = []
        for _ in range(max_draws(n)):
            if len(out) == n:
                return out
            chain = self._draw_chain(rng)
            if chain is None:
                continue
            key = repr((chain[0][0], tuple((op, b) for _, op, b, _ in chain)))
            if split_of(key, self.test_fraction) == split:
                out.append(Problem(prompt=self._prompt(chain), answer=str(chain[-1][3]), meta={"gold_steps": chain}))
        if len(out) < n:
            raise ValueError(f"arith_chain: could not draw {n} {split} problems; the problem space is too small")
        return out

    # ---- scoring ------------------------------------------------------------------------------------------------
    def score(self, problem: Problem, response: str) -> Score:
        """Outcome reward from the ``Answer:`` line; oracle labels, first error and spans from the step lines."""
        if not isinstance(response, str):
            return ZERO
        gold: tuple[Step, ...] = tuple(tuple(s) for s in problem.meta["gold_steps"])
        parsed = parse_response(response)
        labels = label_steps(parsed.steps, gold)
        first_error = labels.index(0) if 0 in labels else None
        correct = parsed.answer is not None and str(parsed.answer) == problem.answer
        if correct:
            reward = 1.0
        else:
            reward = self.partial_credit * sum(labels[: len(gold)]) / len(gold)
        return Score(reward=reward, correct=correct, step_labels=labels, first_error=first_error,
                     step_spans=parsed.spans)

    def demonstration(self, problem: Problem) -> str:
        """The gold steps, one per line, then ``Answer: N`` (N wrong for the `sloppy_demos` share of problems)."""
        steps = problem.meta["gold_steps"]
        lines = [f"{a} {op} {b} = {c}" for a, op, b, c in steps]
        answer = problem.answer
        if self.sloppy_demos and stable_hash(f"sloppy:{problem.prompt}") % 1_000_000 < self.sloppy_demos * 1_000_000:
            answer = str(steps[-1][0])  # the value before the last step: a copy slip a verifier catches
        return "\n".join([*lines, f"Answer: {answer}"])
