"""Item 5: a damaged checkpoint or log never makes a run unrecoverable, and every error names the file."""

import logging
import os

import pytest
import torch

import creditlab.train.checkpoint as checkpoint
from creditlab.cli import main
from creditlab.train.checkpoint import CheckpointError, TrainState, load_checkpoint, save_checkpoint
from creditlab.train.runlog import Logger, read_metrics

from .conftest import TINY
from .conftest import read_metrics as rows_of


def model_at(value):
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.fill_(value)
    return model, torch.optim.AdamW(model.parameters())


def saved_run(tmp_path, steps=(1, 2)):
    run = tmp_path / "run"
    for s in steps:
        save_checkpoint(run, TrainState(step=s, samples=4 * s), *model_at(float(s)))
    return run


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_previous_checkpoint_is_kept_and_older_ones_dropped(tmp_path):
    run = saved_run(tmp_path, steps=(1, 2, 3))
    assert sorted(p.name for p in run.iterdir()) == ["ckpt-000002", "ckpt-000003", "latest"]


# checksum=False: a checkpoint written before state.sha256 existed (a flipped byte inside a tensor is then invisible)
@pytest.mark.parametrize("damage,checksum", [(truncate, True), (flip_a_byte, True), (truncate, False)])
def test_damaged_latest_falls_back_to_the_previous_with_a_warning(tmp_path, caplog, damage, checksum):
    run = saved_run(tmp_path)
    if not checksum:
        for digest in run.glob("ckpt-*/state.sha256"):
            digest.unlink()
    damage(run / "ckpt-000002" / "state.pt")
    model, optim = model_at(0.0)
    with caplog.at_level(logging.WARNING, logger="creditlab.train"):
        state = load_checkpoint(run, model, optim)
    assert state.step == 1 and float(model.weight.detach()[0, 0]) == 1.0  # the weights of step 1, nothing of step 2
    assert "ckpt-000002/state.pt" in caplog.text and "falling back" in caplog.text


def test_after_a_fallback_the_next_save_keeps_the_good_checkpoint(tmp_path):
    run = saved_run(tmp_path, steps=(2, 4))
    truncate(run / "ckpt-000004" / "state.pt")
    assert load_checkpoint(run, *model_at(0.0)).step == 2
    save_checkpoint(run, TrainState(step=3, samples=12), *model_at(3.0))  # the run goes on from step 2
    assert sorted(p.name for p in run.glob("ckpt-*")) == ["ckpt-000002", "ckpt-000003"]  # the stale step 4 is gone


def test_every_checkpoint_damaged_is_one_error_naming_each_file(tmp_path):
    run = saved_run(tmp_path)
    for state in run.glob("ckpt-*/state.pt"):
        truncate(state)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(run, *model_at(0.0))
    assert "ckpt-000001/state.pt" in str(e.value) and "ckpt-000002/state.pt" in str(e.value)


def test_a_checkpoint_that_fails_verification_is_not_published(tmp_path, monkeypatch):
    run = saved_run(tmp_path, steps=(1,))
    real_save = torch.save

    def torn_save(obj, f):  # a write that loses its tail (full disk, flaky storage)
        real_save(obj, f)
        f.truncate(f.tell() // 2)

    monkeypatch.setattr(checkpoint.torch, "save", torn_save)
    with pytest.raises(CheckpointError, match=r"state\.pt"):
        save_checkpoint(run, TrainState(step=2, samples=8), *model_at(2.0))
    monkeypatch.undo()
    assert (run / "latest").read_text().strip() == "ckpt-000001"
    assert sorted(p.name for p in run.iterdir()) == ["ckpt-000001", "latest"]  # no half-written ckpt-000002
    assert load_checkpoint(run, *model_at(0.0)).step == 1


def test_cli_resume_from_a_damaged_checkpoint_is_one_line_naming_the_file(copy_run, capfd):
    run = copy_run()
    truncate(run / "ckpt-000001" / "state.pt")
    assert main(["train", *TINY, "--estimator", "grpo", "--steps", "2", "--out-dir", str(run), "--resume"]) == 2
    err = capfd.readouterr().err
    assert "Traceback" not in err and "ckpt-000001/state.pt" in err.strip().splitlines()[-1]


# ------------------------------------------------------------------ metrics.jsonl
def test_empty_and_torn_metrics_files(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text("")
    assert read_metrics(path) == []
    path.write_text('{"step": 0, "x": 1}\n{"step": 1, "x"')  # killed mid-line
    with caplog.at_level(logging.WARNING, logger="creditlab.train"):
        assert read_metrics(path) == [{"step": 0, "x": 1}]
    assert "torn last line 2" in caplog.text and str(path) in caplog.text
    path.write_text('{"step": 0}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 2 is not valid JSON"):
        read_metrics(path)
    path.write_text('{"step": 0}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 2 is not a metrics row"):
        read_metrics(path)


def test_resume_rewrite_keeps_the_checkpointed_steps_once(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0}\n{"step": 1, "a": 1}\n{"step": 1, "a": 2}\n{"step": 2}\n{"step": 3')
    Logger(tmp_path, tensorboard=False, keep_until=1)
    assert read_metrics(path) == [{"step": 0}, {"step": 1, "a": 2}]


def test_metrics_rewrite_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    original = '{"step": 0}\n{"step": 1}\n{"step": 2}\n'
    path.write_text(original)

    def crash(*args, **kwargs):
        raise OSError("killed during the rewrite")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        Logger(tmp_path, tensorboard=False, keep_until=1)
    monkeypatch.undo()
    assert path.read_text() == original  # the old file, whole


def test_cli_resume_with_an_empty_metrics_file(copy_run):
    run = copy_run()
    (run / "metrics.jsonl").write_text("")
    assert main(["train", *TINY, "--estimator", "grpo", "--steps", "2", "--out-dir", str(run), "--resume"]) == 0
    assert [r["step"] for r in rows_of(run)] == [2]  # the lost rows stay lost; nothing crashes or is duplicated
