"""Item 1: resuming never executes code from a run directory, and `latest` only names a ckpt-NNNNNN inside it."""

import logging
import os

import pytest
import torch

from creditlab.cli import main
from creditlab.train.checkpoint import TrainState, load_checkpoint, save_checkpoint, sha256_of

from .conftest import TINY


class Payload:
    """Unpickling this calls open(marker, "w"): a file appears iff the pickle was executed."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(ckpt_dir, marker, *, checksum=True):
    """Replace ckpt_dir/state.pt with a pickle that runs code; with `checksum`, a matching state.sha256 (so only
    weights_only stands between the file and the code)."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"model": Payload(marker), "optim": {}, "state": {"step": 1, "samples": 0}}, ckpt_dir / "state.pt")
    digest = ckpt_dir / "state.sha256"
    if checksum:
        digest.write_text(sha256_of(ckpt_dir / "state.pt") + "\n")
    else:
        digest.unlink(missing_ok=True)


def test_crafted_checkpoint_does_not_execute_on_resume(copy_run, tmp_path, capfd):
    run = copy_run()
    marker = tmp_path / "PWNED"
    plant(run / "ckpt-000001", marker)
    rc = main(["train", *TINY, "--estimator", "grpo", "--steps", "2", "--out-dir", str(run), "--resume"])
    err = capfd.readouterr().err
    assert rc == 2 and not marker.exists()
    assert "ckpt-000001/state.pt" in err and "cannot be read safely" in err and "Traceback" not in err
    # the test can fail: the same file does run code when loaded the unsafe way
    torch.load(run / "ckpt-000001" / "state.pt", weights_only=False)
    assert marker.exists()
    os.remove(marker)


def linear():
    model = torch.nn.Linear(3, 2)
    return model, torch.optim.AdamW(model.parameters())


@pytest.mark.parametrize("pointer", ["../evil", "{abs}", "ckpt-000009/../../evil", "ckpt-1", " "])
def test_latest_outside_the_run_dir_is_ignored(tmp_path, caplog, pointer):
    run, evil = tmp_path / "run", tmp_path / "evil"
    marker = tmp_path / "PWNED"
    plant(evil, marker)
    model, optim = linear()
    save_checkpoint(run, TrainState(step=1, samples=4), model, optim)
    (run / "latest").write_text(pointer.format(abs=evil))
    with caplog.at_level(logging.WARNING, logger="creditlab.train"):
        state = load_checkpoint(run, *linear())
    assert state.step == 1 and not marker.exists()  # the real checkpoint in the run dir, nothing else
    assert "latest" in caplog.text and "ignoring it" in caplog.text


def test_symlinked_checkpoint_is_not_followed(tmp_path):
    run, evil = tmp_path / "run", tmp_path / "evil"
    marker = tmp_path / "PWNED"
    plant(evil, marker)
    model, optim = linear()
    save_checkpoint(run, TrainState(step=1, samples=4), model, optim)
    (run / "ckpt-000005").symlink_to(evil, target_is_directory=True)
    (run / "latest").write_text("ckpt-000005")
    assert load_checkpoint(run, *linear()).step == 1 and not marker.exists()


def test_crafted_checkpoint_without_checksum_is_refused(tmp_path):
    run, marker = tmp_path / "run", tmp_path / "PWNED"
    plant(run / "ckpt-000001", marker, checksum=False)
    (run / "latest").write_text("ckpt-000001")
    with pytest.raises(ValueError, match=r"ckpt-000001/state\.pt cannot be read safely"):
        load_checkpoint(run, *linear())
    assert not marker.exists()


def test_component_state_that_is_not_plain_is_refused_at_save(tmp_path):
    class Odd:
        name = "odd"

        def state_dict(self):
            return {"rng": __import__("random").Random(0)}

    model, optim = linear()
    with pytest.raises(TypeError, match=r"component 'odd' state_dict\(\)\['rng'\] is a random.Random"):
        save_checkpoint(tmp_path, TrainState(step=1), model, optim, [Odd()])
    assert not list(tmp_path.iterdir())  # nothing half-written
