"""Item 2: `creditlab demo` never deletes what it did not create, and refuses bad names before any work."""

import pytest

import creditlab.demo as demo
from creditlab.cli import main


def one_error_line(capfd):
    out, err = capfd.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return out, lines[0]


def test_non_empty_foreign_directory_is_refused_and_kept(tmp_path, capfd):
    root = tmp_path / "mine"
    (root / "grpo").mkdir(parents=True)
    (root / "thesis.tex").write_text("years of work")
    (root / "grpo" / "data.csv").write_text("1,2")
    assert main(["demo", "--out-root", str(root)]) == 2
    out, line = one_error_line(capfd)
    assert "--out-root" in line and "not empty" in line
    assert out == ""  # refused before the estimator table, the warm-start or any training
    assert (root / "thesis.tex").read_text() == "years of work" and (root / "grpo" / "data.csv").exists()


def test_out_root_that_is_a_file_is_refused(tmp_path, capfd):
    path = tmp_path / "file"
    path.write_text("x")
    assert main(["demo", "--out-root", str(path)]) == 2
    assert "--out-root" in one_error_line(capfd)[1] and path.read_text() == "x"


@pytest.mark.parametrize("name,needle", [("nope", "unknown estimator"), ("gae", "values"), ("grpo", "differ")])
def test_other_estimator_is_checked_before_any_work(tmp_path, capfd, name, needle):
    root = tmp_path / "demo"
    assert main(["demo", "--out-root", str(root), "--other-estimator", name]) == 2
    out, line = one_error_line(capfd)
    assert "--other-estimator" in line and needle in line and out == "" and not root.exists()


def test_rerun_replaces_only_the_demos_own_output(tmp_path, monkeypatch):
    root = tmp_path / "demo"
    root.mkdir()
    (root / demo.MARKER).write_text("")
    for name in demo.demo_dirs("tempo"):
        (root / name).mkdir()
        (root / name / "old.txt").write_text("stale")
    (root / "notes.txt").write_text("mine")
    (root / "other-run").mkdir()

    def stop(*args, **kwargs):
        raise RuntimeError("stop after the clean-up")

    monkeypatch.setattr(demo, "sft", stop)
    with pytest.raises(RuntimeError, match="stop"):
        demo.run_demo(out_root=str(root), other="tempo")
    assert not any((root / name).exists() for name in demo.demo_dirs("tempo"))  # its own output: replaced
    assert (root / "notes.txt").read_text() == "mine" and (root / "other-run").is_dir()  # the rest: untouched


def test_fresh_directory_gets_the_marker(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "sft", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("stop")))
    with pytest.raises(RuntimeError):
        demo.run_demo(out_root=str(tmp_path / "new" / "demo"))
    assert (tmp_path / "new" / "demo" / demo.MARKER).is_file()
