"""The run directory's rules: what `train` may write where, and when `--resume` may continue a run.

- A fresh run needs a directory that does not exist, is empty, or holds a creditlab run that never reached its
  first checkpoint (its files are replaced). A directory with a checkpoint needs `--resume`; any other non-empty
  directory is refused: the trainer never writes over files it did not create.
- `--resume` needs a checkpoint and a config.json whose options equal this run's, except run length and logging
  (`TrainConfig.resume_differences` lists the others).
- While a run writes to its directory it holds an exclusive lock on `RUN_DIR/.lock` (where the platform has
  `fcntl`), so a second trainer on the same directory is refused instead of interleaving checkpoints; stale
  temporary files of a killed writer are removed once the lock is held.

`check_run_dir` only reads; `open_run_dir` creates the directory, and is called after everything that can fail on
the user's input (names, task files, policy directory) has been built.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO, Any

from creditlab.train.checkpoint import clean_stale, has_checkpoint
from creditlab.train.config import TrainConfig

OWN_FILES = {".lock"}


def default_run_dir(cfg: TrainConfig) -> Path:
    policy = Path(cfg.run.policy).name or cfg.run.policy
    return Path("runs") / f"{cfg.run.task}-{policy}-{cfg.run.estimator}-s{cfg.run.seed}"


def read_config(run_dir: Path) -> dict[str, Any] | None:
    """The run's config.json as a dict, or None when there is none; ValueError naming the file when unreadable."""
    path = run_dir / "config.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise ValueError(f"{path} is not readable JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("run"), dict):
        raise ValueError(f"{path} is not a creditlab run config (no 'run' section)")
    return data


def check_run_dir(cfg: TrainConfig) -> Path:
    """The run directory `cfg` may use (see the module docstring); raises naming the option otherwise."""
    run_dir = Path(cfg.run.out_dir) if cfg.run.out_dir else default_run_dir(cfg)
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"--out-dir {run_dir} is a file, not a directory")
    if cfg.run.resume:
        if not run_dir.is_dir() or not has_checkpoint(run_dir):
            raise FileNotFoundError(f"--resume: no checkpoint in {run_dir} (nothing to resume; drop --resume to "
                                    "start this run)")
        saved = read_config(run_dir)
        if saved is None:
            raise FileNotFoundError(f"--resume: {run_dir / 'config.json'} is missing: cannot check that this is the "
                                    "same run")
        diffs = cfg.resume_differences(saved)
        if diffs:
            raise ValueError(f"--resume: {run_dir} was started with other options ({'; '.join(diffs)}); only "
                             "--steps, --eval-every, --out-dir and logging options may change when resuming")
        return run_dir
    if not run_dir.is_dir():
        return run_dir
    if has_checkpoint(run_dir):
        raise FileExistsError(f"{run_dir} already holds a run; pass --resume to continue it or pick --out-dir")
    if {p.name for p in run_dir.iterdir()} - OWN_FILES and not _is_run_dir(run_dir):
        raise FileExistsError(f"--out-dir {run_dir} is not empty and holds no creditlab run (no config.json with a "
                              "'run' section); pick a new or empty directory")
    return run_dir


def _is_run_dir(run_dir: Path) -> bool:
    try:
        return read_config(run_dir) is not None
    except ValueError:
        return False


def open_run_dir(run_dir: Path) -> IO[str]:
    """Create the directory, take its lock (keep the returned file open while writing) and clean stale files."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = open(run_dir / ".lock", "w")  # held open (and locked) for the whole run
    try:
        import fcntl
    except ImportError:  # no advisory locks on this platform: run without one
        fcntl = None  # type: ignore[assignment]
    if fcntl is not None:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            raise FileExistsError(f"{run_dir} is in use by another creditlab process") from None
    clean_stale(run_dir)
    return lock
