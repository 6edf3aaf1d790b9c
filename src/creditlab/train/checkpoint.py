"""Checkpoints of a run directory: written so that a kill at any moment leaves a readable one, read without
executing anything from the file.

Layout: `RUN_DIR/ckpt-NNNNNN/state.pt` (model, optimizer, `TrainState`, every component's state) and
`state.sha256` (its checksum), plus a one-line `RUN_DIR/latest` naming the newest checkpoint.

Writing (`save_checkpoint`): the state is checked to be tensors and plain values, written to a temporary directory,
fsynced, checksummed and read back (checksum and `torch.load(weights_only=True)`), renamed to `ckpt-NNNNNN`, and
only then is `latest` replaced (write a temporary file, fsync, `os.replace`). The checkpoint before it is kept (two
in all), so a checkpoint damaged later on disk has a fallback; older ones are deleted.

Reading (`load_checkpoint`): `latest` must name a `ckpt-NNNNNN` directory inside the run directory (anything else
is ignored with a warning: no absolute paths, no `..`, no symlinks), the checksum must match, and the file is read
with `torch.load(weights_only=True)`, which refuses to run code. An unreadable checkpoint makes the loader fall
back to the next newest one with a warning; when none is readable the error names every file it tried.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("creditlab.train")

CKPT_NAME = re.compile(r"ckpt-(\d{6,})")
STATE_KEYS = ("model", "optim", "state", "components")


@dataclass
class TrainState:
    step: int = 0  # last completed step
    samples: int = 0  # responses generated so far (every sampled response counts)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read (the message names the file)."""


# ------------------------------------------------------------------ small file helpers
def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Replace `path` with `text` atomically: a reader sees the old or the new content, never a torn file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def clean_stale(run_dir: Path) -> None:
    """Remove what a killed writer leaves behind: temporary checkpoint directories and pointer/log files."""
    for junk in (*run_dir.glob(".tmp-ckpt-*"), *run_dir.glob(".latest-*"), *run_dir.glob(".*.tmp-*")):
        if junk.is_dir() and not junk.is_symlink():
            shutil.rmtree(junk, ignore_errors=True)
        else:
            junk.unlink(missing_ok=True)


# ------------------------------------------------------------------ writing
def check_plain(value: Any, where: str) -> None:
    """Refuse anything `torch.load(weights_only=True)` would not read back: only tensors, numbers, strings, bytes,
    None, and lists/tuples/dicts of them."""
    if value is None or isinstance(value, (torch.Tensor, bool, int, float, str, bytes, torch.dtype, torch.Size)):
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_plain(v, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: key {k!r} is a {type(k).__name__}, not a str or int")
            check_plain(v, f"{where}[{k!r}]")
        return
    raise TypeError(f"{where} is a {type(value).__module__}.{type(value).__name__}: a checkpoint holds only tensors "
                    "and plain Python values (it is read with torch.load(weights_only=True))")


def save_checkpoint(run_dir: Path, state: TrainState, model: torch.nn.Module, optim: torch.optim.Optimizer,
                    components: Sequence[Any] = ()) -> Path:
    """Write, verify and publish `ckpt-<step>/` (see the module docstring); returns its path."""
    blob = {"model": model.state_dict(), "optim": optim.state_dict(), "state": dataclasses.asdict(state),
            "components": {c.name: c.state_dict() for c in components}}
    for c in components:
        check_plain(blob["components"][c.name], f"component {c.name!r} state_dict()")
    final = run_dir / f"ckpt-{state.step:06d}"
    tmp = run_dir / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with open(tmp / "state.pt", "wb") as f:
            torch.save(blob, f)
            f.flush()
            os.fsync(f.fileno())
        (tmp / "state.sha256").write_text(sha256_of(tmp / "state.pt") + "\n")
        read_state(tmp, mmap=True)  # read it back as a resume would: checksum, weights_only, keys
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    fsync_dir(run_dir)
    pointer = run_dir / f".latest-{os.getpid()}"
    pointer.write_text(final.name + "\n")
    with open(pointer) as f:
        os.fsync(f.fileno())
    os.replace(pointer, run_dir / "latest")
    fsync_dir(run_dir)
    # Keep the newest checkpoint before this one as the fallback; drop older ones, and later ones left behind by a
    # run that resumed from an earlier checkpoint (their steps are being redone).
    fallback = [c for c in checkpoints(run_dir) if step_of(c) < state.step][:1]
    for old in checkpoints(run_dir):
        if old != final and old not in fallback:
            shutil.rmtree(old, ignore_errors=True)
    clean_stale(run_dir)
    return final


# ------------------------------------------------------------------ reading
def step_of(ckpt: Path) -> int:
    match = CKPT_NAME.fullmatch(ckpt.name)
    return int(match.group(1)) if match else -1


def checkpoints(run_dir: Path) -> list[Path]:
    """The `ckpt-NNNNNN` directories of `run_dir` (real directories, no symlinks), newest first."""
    found = [p for p in run_dir.glob("ckpt-*") if CKPT_NAME.fullmatch(p.name) and p.is_dir() and not p.is_symlink()]
    return sorted(found, key=step_of, reverse=True)


def has_checkpoint(run_dir: Path) -> bool:
    return (run_dir / "latest").exists() or bool(checkpoints(run_dir))


def candidates(run_dir: Path) -> list[Path]:
    """Checkpoints to try, in order: the one `latest` names (if it is a valid name), then the others, newest first."""
    found = checkpoints(run_dir)
    pointer = run_dir / "latest"
    if not pointer.exists():
        return found
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        name = "<unreadable>"
    target = run_dir / name
    if not CKPT_NAME.fullmatch(name) or target not in found:
        logger.warning("creditlab: %s names %r, which is not a ckpt-NNNNNN directory in %s; ignoring it",
                       pointer, name[:80], run_dir)
        return found
    return [target, *(p for p in found if p != target)]


def read_state(ckpt: Path, *, mmap: bool = False) -> dict[str, Any]:
    """The checked content of `ckpt/state.pt`; `CheckpointError` naming the file when it cannot be trusted.
    A checkpoint without `state.sha256` (written before creditlab kept one) is read without the checksum."""
    path = ckpt / "state.pt"
    if path.is_symlink() or not path.is_file():
        raise CheckpointError(f"{path} is missing or not a regular file")
    digest = ckpt / "state.sha256"
    if digest.exists():
        try:
            expected = digest.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            expected = "<unreadable>"
        if expected != sha256_of(path):
            raise CheckpointError(f"{path} does not match its checksum in {digest.name} (truncated or corrupted)")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # a torn zip, a bit flip, or a pickle that wants to run code: never trusted
        first = (str(e).strip().splitlines() or [""])[0]
        raise CheckpointError(f"{path} cannot be read safely ({type(e).__name__}: {first[:300]})") from None
    if not isinstance(blob, dict) or any(k not in blob for k in ("model", "optim", "state")):
        raise CheckpointError(f"{path} is not a creditlab checkpoint (expected keys {list(STATE_KEYS)})")
    return blob


def load_checkpoint(run_dir: Path, model: torch.nn.Module, optim: torch.optim.Optimizer,
                    components: Sequence[Any] = ()) -> TrainState:
    """Restore the newest readable checkpoint into model, optimizer and components; returns its `TrainState`."""
    tried: list[str] = []
    for ckpt in candidates(run_dir):
        try:
            blob = read_state(ckpt)
        except CheckpointError as e:
            logger.warning("creditlab: %s; falling back to an older checkpoint", e)
            tried.append(str(e))
            continue
        if tried:
            logger.warning("creditlab: resuming from %s, an older checkpoint", ckpt)
        return _restore(ckpt / "state.pt", blob, model, optim, components)
    if not tried:
        raise FileNotFoundError(f"--resume: no checkpoint in {run_dir} (no {run_dir / 'latest'} and no ckpt-NNNNNN "
                                "directory)")
    raise CheckpointError(f"--resume: no readable checkpoint in {run_dir}: " + "; ".join(tried))


def _restore(path: Path, blob: dict[str, Any], model: torch.nn.Module, optim: torch.optim.Optimizer,
             components: Sequence[Any]) -> TrainState:
    saved = blob.get("components", {})
    names = [c.name for c in components]
    if set(saved) != set(names):
        raise CheckpointError(f"{path} holds state for components {sorted(saved)}, this run has {sorted(names)}")
    try:
        model.load_state_dict(blob["model"])
        optim.load_state_dict(blob["optim"])
        for c in components:
            c.load_state_dict(saved[c.name])
        return TrainState(**blob["state"])
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise CheckpointError(f"{path} does not fit this run ({type(e).__name__}: {first[:300]})") from None
