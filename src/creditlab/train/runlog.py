"""A run's metrics log: `metrics.jsonl` (one JSON object per step) plus optional TensorBoard scalars.

Lines are appended and flushed one step at a time, so a kill can tear at most the last line. Reading tolerates
that torn last line (dropped with a warning) and an empty file; any other malformed line is an error naming the
file and line. When a run starts, the file is rewritten atomically to hold the rows it keeps: none on a fresh start
(so a restart before the first checkpoint does not log step 0 twice), the steps up to the checkpoint on resume.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from creditlab.train.checkpoint import atomic_write_text

logger = logging.getLogger("creditlab.train")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl file (missing file: none); `ValueError` naming file and line on a bad row."""
    if not path.exists():
        return []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e})") from None
    rows = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if n == len(lines):  # the line a kill interrupted
                logger.warning("creditlab: dropping the torn last line %d of %s", n, path)
                break
            raise ValueError(f"{path}: line {n} is not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise ValueError(f"{path}: line {n} is not a metrics row (an object with an integer 'step')")
        rows.append(row)
    return rows


class Logger:
    """metrics.jsonl (one line per step) + TensorBoard scalars.

    keep_until: keep the rows of steps <= keep_until already in the file (resume; the last row of a step wins),
        None to start the file afresh. `rows` holds the kept rows.
    """

    def __init__(self, run_dir: Path, *, tensorboard: bool, keep_until: int | None = None) -> None:
        self.path = run_dir / "metrics.jsonl"
        kept: dict[int, dict[str, Any]] = {}
        if keep_until is not None:
            for row in read_metrics(self.path):
                if row["step"] <= keep_until:
                    kept[row["step"]] = row
        self.rows = [kept[s] for s in sorted(kept)]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.rows))
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        row = {"step": step, **metrics}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        self.rows.append(row)
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()

    def last(self, key: str) -> Any:
        """The newest logged value of `key` (None if never logged)."""
        return next((r[key] for r in reversed(self.rows) if key in r), None)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
