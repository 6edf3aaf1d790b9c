"""Item 4: --resume refuses another configuration (naming the keys) and refuses a directory without a checkpoint."""

import pytest

from creditlab.cli import main
from creditlab.train.config import TrainConfig

from .conftest import TINY


def resume(run, *extra, steps=2):
    return main(["train", *TINY, "--estimator", "grpo", "--steps", str(steps), "--out-dir", str(run), "--resume",
                 *extra])


@pytest.mark.parametrize("extra,flags", [
    (["--estimator", "rloo"], ["--estimator"]),
    (["--seed", "1"], ["--seed"]),
    (["--lr", "0.01"], ["--lr"]),
    (["--lr", "0.01", "--group-size", "2", "--kl-coef", "0.1"], ["--lr", "--group-size", "--kl-coef"]),
    (["--task-kwargs", '{"n_steps": 3}'], ["--task-kwargs"]),
])
def test_resume_with_other_options_is_refused(copy_run, capfd, extra, flags):
    run = copy_run()
    before = (run / "config.json").read_text()
    assert resume(run, *extra) == 2
    err = capfd.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--resume" in err
    assert all(f"{flag}:" in err for flag in flags)
    assert (run / "config.json").read_text() == before  # config.json not rewritten
    assert sorted(p.name for p in run.glob("ckpt-*")) == ["ckpt-000001"]


def test_run_length_and_logging_may_change():
    saved = TrainConfig().to_dict()
    cfg = TrainConfig()
    cfg.run.steps, cfg.run.resume, cfg.run.out_dir, cfg.eval.eval_every = 99, True, "elsewhere", 3
    cfg.log.checkpoint_every, cfg.log.tensorboard, cfg.log.progress, cfg.log.sample_every = 7, False, False, 0
    assert cfg.resume_differences(saved) == []
    cfg.run.task_kwargs = "{}"  # same JSON content as the default, written differently
    saved["run"]["task_kwargs"] = "{ }"
    assert cfg.resume_differences(saved) == []
    saved["future"] = {"knob": 1}  # a key this version does not know is a difference too
    assert cfg.resume_differences(saved) == ["--knob: 1 -> '<absent>'"]


def test_a_section_added_later_compares_with_its_default():
    saved = TrainConfig().to_dict()
    del saved["optim"]  # an older config.json without a section: its options were the defaults
    assert TrainConfig().resume_differences(saved) == []


def test_resume_without_a_checkpoint_is_an_error(tmp_path, capfd):
    for run in (tmp_path / "missing", tmp_path / "empty"):
        if run.name == "empty":
            run.mkdir()
        assert resume(run) == 2
        err = capfd.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--resume: no checkpoint" in err and str(run) in err
    assert not (tmp_path / "missing").exists()


def test_resume_with_a_damaged_config_json_names_the_file(copy_run, capfd):
    run = copy_run()
    (run / "config.json").write_text("{not json")
    assert resume(run) == 2
    assert "config.json" in capfd.readouterr().err
