"""`creditlab inspect RUN_DIR [--step K] [--out FILE]`: one training step's sampled responses as an HTML page.

Reads `RUN_DIR/samples/step_XXXXXX.json` (written by the trainer's `dump_samples`: {"rows": [{"group", "reward",
"prompt", "tokens", "advantages"}]}) and `RUN_DIR/config.json` (for the estimator name), and writes a
self-contained page (`creditlab.viz.html.render_page`). Works for any estimator: it only reads advantages.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from creditlab.viz.html import render_page

_STEP_FILE = re.compile(r"step_(\d+)\.json$")


def available_steps(run_dir: Path) -> list[int]:
    """Sorted steps that have a samples file in `run_dir/samples/`."""
    files = (run_dir / "samples").glob("step_*.json")
    return sorted(int(m.group(1)) for f in files if (m := _STEP_FILE.search(f.name)))


def samples_path(run_dir: Path, step: int | None = None) -> Path:
    """The samples file of `step` (default: the latest); `FileNotFoundError` listing the available steps."""
    steps = available_steps(run_dir)
    if not steps:
        raise FileNotFoundError(f"no samples in {run_dir / 'samples'} (is {run_dir} a creditlab run directory? "
                                "the trainer writes samples/step_XXXXXX.json every log.samples_every steps)")
    if step is None:
        step = steps[-1]
    if step not in steps:
        raise FileNotFoundError(f"no samples for step {step} in {run_dir / 'samples'}; available steps: {steps}")
    return run_dir / "samples" / f"step_{step:06d}.json"


def run_estimator(run_dir: Path) -> str:
    """The estimator name recorded in `run_dir/config.json` ("?" when the file or the key is missing)."""
    path = run_dir / "config.json"
    if not path.is_file():
        return "?"
    config = _read_json(path)
    if not isinstance(config, dict):
        return "?"
    if isinstance(config.get("run"), dict) and "estimator" in config["run"]:
        return str(config["run"]["estimator"])
    return str(config.get("estimator", "?"))


ROW_KEYS = ("tokens", "advantages")  # required; "group", "reward", "prompt", "mask" are optional


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:  # JSONDecodeError / UnicodeDecodeError are ValueErrors
        raise ValueError(f"{path}: not a readable JSON file ({e})") from None


def read_rows(path: Path) -> list[dict]:
    """The rows of a samples file, checked: a one-line ValueError names the file, the row and the missing key."""
    data = _read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise ValueError(f"{path}: expected an object with a 'rows' list (written by the trainer's dump_samples)")
    for i, row in enumerate(data["rows"]):
        if not isinstance(row, dict):
            raise ValueError(f"{path}: row {i} is not an object")
        for key in ROW_KEYS:
            if not isinstance(row.get(key), list):
                problem = "has no" if key not in row else "has a non-list"
                raise ValueError(f"{path}: row {i} {problem} {key!r} (each row needs lists {' and '.join(ROW_KEYS)})")
        if len(row["tokens"]) != len(row["advantages"]):
            raise ValueError(f"{path}: row {i} has {len(row['tokens'])} tokens but {len(row['advantages'])} advantages")
        if not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in row["advantages"]):
            raise ValueError(f"{path}: row {i}: every advantage must be a number")
    return data["rows"]


def inspect_run(run_dir: str | Path, step: int | None = None, out: str | Path | None = None) -> Path:
    """Write the inspect page of `step` (default: latest) of `run_dir`; return its path.

    out: the HTML file (default `RUN_DIR/inspect/step_XXXXXX.html`).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    path = samples_path(run_dir, step)
    step = int(_STEP_FILE.search(path.name).group(1))  # type: ignore[union-attr]
    rows = read_rows(path)
    estimator = run_estimator(run_dir)
    n_tokens = sum(len(r["tokens"]) for r in rows)
    meta = f"run {run_dir} · estimator {estimator} · step {step} · {len(rows)} responses · {n_tokens} tokens"
    page = render_page(rows, title=f"creditlab inspect: {estimator}, step {step}", meta=meta)
    out_path = Path(out) if out is not None else run_dir / "inspect" / f"step_{step:06d}.html"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(page, encoding="utf-8")
    return out_path


def add_inspect_args(parser: argparse.ArgumentParser) -> None:
    """Arguments of `creditlab inspect`."""
    parser.add_argument("run_dir", help="a run directory written by `creditlab train`")
    parser.add_argument("--step", type=int, default=None, help="training step to show (default: the latest)")
    parser.add_argument("--out", default=None, help="HTML file to write (default RUN_DIR/inspect/step_K.html)")


def run_inspect(args: argparse.Namespace) -> int:
    """`creditlab inspect`: write the page and print its path."""
    print(inspect_run(args.run_dir, step=args.step, out=args.out))
    return 0


def inspect_main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (`python -m creditlab.viz.inspect RUN_DIR`)."""
    parser = argparse.ArgumentParser(prog="creditlab inspect", description=__doc__.splitlines()[0])
    add_inspect_args(parser)
    return run_inspect(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(inspect_main())
