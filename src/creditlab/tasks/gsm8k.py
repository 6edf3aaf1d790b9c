"""gsm8k: GSM8K-format data (``question`` / ``answer`` ending in ``#### N``) from a local JSONL or parquet file.

No package ships GSM8K and nothing may be downloaded, so the task reads files you provide:
``get_task("gsm8k", path="gsm8k.jsonl")`` splits one file into train/test by a stable hash of the question;
``get_task("gsm8k", train_path=..., test_path=...)`` uses two files as given.

Answers are checked with math-verify (``parse`` + ``verify``), so "0.5", "1/2" and ``\\frac{1}{2}`` all match a
gold answer of 1/2. math-verify's timeouts use ``signal.alarm``, which only works in the main thread; elsewhere
(e.g. a scoring thread pool) the timeouts are switched off, as math-verify's documentation asks.
"""

from __future__ import annotations

import json
import random
import re
import threading
from pathlib import Path
from typing import Any

from creditlab.tasks.base import (
    ANSWER_INSTRUCTION,
    ZERO,
    Problem,
    Score,
    check_split,
    extract_final_answer,
    extract_number,
    split_of,
)

_CALCULATOR = re.compile(r"<<[^>]*>>")  # GSM8K's calculator annotations, e.g. "48/2=<<48/2=24>>24"


def load_rows(path: str | Path) -> list[dict[str, str]]:
    """Rows ``{"question", "answer"}`` of a local file: JSON lines (``.jsonl``, or ``.json`` holding one object per
    line), a ``.json`` array of objects, or ``.parquet``.

    Bad input raises a one-line ValueError naming the file and, for text files, the line: not UTF-8 text, not JSON,
    not an object, a missing or non-string ``question``/``answer``, an answer without its ``#### N`` final answer.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"gsm8k file {path} " + ("is not a file" if path.exists() else "does not exist"))
    if path.suffix == ".parquet":
        return [_check_row(row, f"{path}: row {i + 1}") for i, row in enumerate(_parquet_rows(path))]
    raw = path.read_bytes()
    if path.suffix == ".json" and raw.lstrip()[:1] == b"[":
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a JSON array of GSM8K rows ({e})") from None
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON array of GSM8K rows")
        return [_check_row(row, f"{path}: item {i + 1}") for i, row in enumerate(data)]
    rows = []
    for n, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            raise ValueError(f"{path}: line {n} is not UTF-8 text (is this a binary file?)") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {n} is not valid JSON ({e.msg}, column {e.colno})") from None
        rows.append(_check_row(row, f"{path}: line {n}"))
    return rows


def _parquet_rows(path: Path) -> list[Any]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow's errors for a file that is not parquet
        first = (str(e).splitlines() or [""])[0]
        raise ValueError(f"{path}: not a readable parquet file ({type(e).__name__}: {first})") from None


def _check_row(row: Any, where: str) -> dict[str, str]:
    """``{"question", "answer"}`` of one row, or a ValueError starting with ``where`` (file and line)."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object with 'question' and 'answer', got {type(row).__name__}")
    missing = [k for k in ("question", "answer") if k not in row]
    if missing:
        raise ValueError(f"{where}: GSM8K format needs 'question' and 'answer'; missing {missing}")
    for key in ("question", "answer"):
        if not isinstance(row[key], str):
            raise ValueError(f"{where}: {key!r} must be a string, got {type(row[key]).__name__}")
    try:
        gold_answer(row["answer"])
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return {"question": row["question"], "answer": row["answer"]}


def gold_answer(solution: str) -> str:
    """The final answer after ``####`` (thousands separators removed)."""
    if "####" not in solution:
        raise ValueError(f"GSM8K answer without '#### N': {solution[-80:]!r}")
    return solution.split("####")[-1].strip().replace(",", "")


def _timeout_kwargs() -> tuple[dict[str, Any], dict[str, Any]]:
    """math-verify's default (signal-based) timeouts in the main thread; none elsewhere, where signals fail."""
    if threading.current_thread() is threading.main_thread():
        return {}, {}
    return {"parsing_timeout": None}, {"timeout_seconds": None}


def answers_match(gold: str, predicted: str) -> bool:
    """math-verify equivalence of two answer strings; False on anything unparsable."""
    from math_verify import parse, verify

    parse_kw, verify_kw = _timeout_kwargs()
    try:
        gold_parsed = parse(gold, **parse_kw)
        pred_parsed = parse(predicted, **parse_kw)
        return bool(pred_parsed) and bool(verify(gold_parsed, pred_parsed, **verify_kw))
    except Exception:  # math-verify raises on pathological input (and on timeouts); that answer is wrong
        return False


class GSM8K:
    """GSM8K-format word problems from local files, scored with math-verify.

    Args:
        path: one file holding both splits (split by a stable hash of the question).
        train_path, test_path: separate files per split (instead of ``path``).
        test_fraction: share of questions reserved for test when ``path`` is used.
    """

    name = "gsm8k"

    def __init__(self, path: str | Path | None = None, *, train_path: str | Path | None = None,
                 test_path: str | Path | None = None, test_fraction: float = 0.2) -> None:
        if (path is None) == (train_path is None and test_path is None):
            raise ValueError("gsm8k needs either path=... or train_path=... and test_path=...")
        if path is not None:
            rows = load_rows(path)
            if not rows:
                raise ValueError(f"gsm8k file {path} holds no rows")
            self.rows = {s: [r for r in rows if split_of(r["question"], test_fraction) == s] for s in ("train", "test")}
        else:
            self.rows = {"train": load_rows(train_path) if train_path else [],
                         "test": load_rows(test_path) if test_path else []}

    def problems(self, split: str, n: int, seed: int) -> list[Problem]:
        """``n`` problems: the split shuffled by ``seed``; when ``n`` exceeds the split, further shuffled epochs."""
        check_split(split)
        rows = self.rows[split]
        if n > 0 and not rows:
            raise ValueError(f"gsm8k: the {split} split is empty")
        rng = random.Random(f"gsm8k:{split}:{seed}")
        out: list[Problem] = []
        while len(out) < n:
            order = list(range(len(rows)))
            rng.shuffle(order)
            out.extend(self._problem(rows[i]) for i in order[: n - len(out)])
        return out

    @staticmethod
    def _problem(row: dict[str, str]) -> Problem:
        prompt = f"{row['question'].strip()}\n{ANSWER_INSTRUCTION}"
        return Problem(prompt=prompt, answer=gold_answer(row["answer"]), meta={"solution": row["answer"]})

    def score(self, problem: Problem, response: str) -> Score:
        """math-verify on the "The answer is X." text (fallback: the last number in the response)."""
        if not isinstance(response, str):
            return ZERO
        predicted = extract_final_answer(response) or extract_number(response, last=True)
        if predicted is None:
            return ZERO
        correct = answers_match(problem.answer, predicted)
        return Score(reward=float(correct), correct=correct)

    def demonstration(self, problem: Problem) -> str:
        """The reference solution without calculator annotations, then "The answer is N."."""
        reasoning = _CALCULATOR.sub("", problem.meta["solution"].split("####")[0]).strip()
        return f"{reasoning}\nThe answer is {problem.answer}.".strip()
