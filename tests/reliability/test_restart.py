"""Items 6 and 13, and issue 18's progress bar: restarts, where the run directory appears, stale files."""

import shutil

import pytest

from creditlab.cli import main
from creditlab.train.rundir import open_run_dir

from .conftest import TINY, read_metrics


def test_restart_before_the_first_checkpoint_logs_step_0_once(copy_run, capfd):
    run = copy_run()
    for ckpt in run.glob("ckpt-*"):  # as if killed after step 1 was logged, before its checkpoint
        shutil.rmtree(ckpt)
    (run / "latest").unlink()
    assert [r["step"] for r in read_metrics(run)] == [0, 1]
    argv = ["train", *TINY, "--estimator", "grpo", "--out-dir", str(run)]
    assert main([*argv, "--steps", "2", "--resume"]) == 2  # nothing to resume
    assert "no checkpoint" in capfd.readouterr().err
    assert main([*argv, "--steps", "2", "--progress"]) == 0  # a fresh start replaces the aborted run's log
    assert [r["step"] for r in read_metrics(run)] == [0, 1, 2]
    bar = capfd.readouterr().err
    assert "acc=nan" not in bar and "acc=0.000" in bar  # issue 18: the last evaluation between evaluations


def test_foreign_non_empty_out_dir_is_refused(tmp_path, capfd):
    out = tmp_path / "papers"
    out.mkdir()
    (out / "config.json").write_text('{"mine": true}')  # someone else's config.json: never overwritten
    assert main(["train", *TINY, "--steps", "1", "--out-dir", str(out)]) == 2
    assert "--out-dir" in capfd.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]
    assert (out / "config.json").read_text() == '{"mine": true}'


@pytest.mark.parametrize("flag,value", [
    ("--task", "{outside}"), ("--task", "nope"), ("--estimator", "nope"), ("--scorer", "nope"),
    ("--policy", "{empty_dir}"), ("--task-kwargs", '{{"nsteps": 2}}'), ("--steps", "0"),
])
def test_no_directory_is_created_before_the_options_are_valid(tmp_path, monkeypatch, capfd, flag, value):
    work = tmp_path / "cwd"
    work.mkdir()
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(work)
    value = value.format(outside=tmp_path / "outside", empty_dir=tmp_path / "empty")
    args = list(TINY)
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    assert main(["train", *args, *([] if flag == "--steps" else ["--steps", "1"])]) == 2
    assert flag in capfd.readouterr().err
    assert list(work.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["cwd", "empty"]


def test_stale_files_of_a_killed_writer_are_cleaned_on_start(copy_run):
    run = copy_run()
    (run / ".latest-99999").write_text("ckpt-000001")  # killed during the pointer write
    (run / ".tmp-ckpt-000002-99999").mkdir()  # killed while writing a checkpoint
    (run / ".tmp-ckpt-000002-99999" / "state.pt").write_bytes(b"\0" * 10)
    (run / ".metrics.jsonl.tmp-99999").write_text("{")  # killed during the metrics rewrite
    assert main(["train", *TINY, "--estimator", "grpo", "--steps", "2", "--out-dir", str(run), "--resume"]) == 0
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == [".lock"]


def test_a_second_writer_on_the_same_directory_is_refused(tmp_path):
    lock = open_run_dir(tmp_path / "run")
    try:
        with pytest.raises(FileExistsError, match="in use"):
            open_run_dir(tmp_path / "run")
    finally:
        lock.close()
    open_run_dir(tmp_path / "run").close()  # free again once the first writer is gone
