"""Item 12: every bad invocation ends with exit code 2 and ONE line on stderr naming the option, no traceback.

The table holds the issue's cases (tracebacks, silently accepted values, misleading messages) and more. Most run
in-process through `main([...])` (fd-level capture, so library logging counts too); a few run as real processes.
"""

import json
import os
import re
import subprocess
import sys

import pytest

from creditlab.cli import main

from .conftest import TINY

# train on the tiny policy; every case overrides or adds options
BASE = [*TINY, "--steps", "1"]

TRAIN_CASES = [
    # (options, text the one error line must contain)
    # -- the tracebacks
    (["--checkpoint-every", "0"], "--checkpoint-every"),
    (["--eval-every", "0"], "--eval-every"),
    (["--minibatches", "0"], "--minibatches"),
    (["--train-pool", "0"], "--train-pool"),
    (["--top-p", "0"], "--top-p"),
    (["--task-kwargs", '{"n_step": 2}'], "--task-kwargs"),
    (["--task-kwargs", '{"n_step": 2}'], "n_steps"),  # lists the valid keys
    (["--estimator-kwargs", '{"epss": 1e-6}'], "--estimator-kwargs"),
    (["--estimator-kwargs", '{"epss": 1e-6}'], "eps"),
    (["--scorer", "oracle", "--scorer-kwargs", '{"nois": 0.1}'], "--scorer-kwargs"),
    (["--scorer", "oracle", "--scorer-kwargs", '{"nois": 0.1}'], "noise"),
    (["--policy", "<policy_no_weights>"], "--policy"),
    (["--policy", "<policy_no_weights>"], "no model weights"),
    (["--policy", "<policy_bad_json>"], "--policy"),
    (["--policy", "<policy_bad_json>"], "config.json"),
    (["--policy", "<policy_unknown_type>"], "--policy"),
    (["--policy", "<policy_bad_weights>"], "--policy"),
    (["--out-dir", "<a_file>/run"], "--out-dir"),
    (["--out-dir", "<a_file>"], "--out-dir"),
    (["--task", "gsm8k", "--task-kwargs", '{"path": "<gsm8k_binary>"}'], "--task-kwargs"),
    (["--task", "gsm8k", "--task-kwargs", '{"path": "<gsm8k_binary>"}'], "line 1 is not UTF-8"),
    # -- the silently accepted values
    (["--temperature", "nan"], "--temperature"),
    (["--kl-coef", "nan"], "--kl-coef"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--steps", "-1"], "--steps"),
    (["--ppo-epochs", "0"], "--ppo-epochs"),
    (["--max-grad-norm", "0"], "--max-grad-norm"),
    (["--clip-low", "2"], "--clip-low"),
    (["--top-p", "2"], "--top-p"),
    (["--minibatches", "9"], "--minibatches"),  # 2 prompts x 4 samples = 8 rows
    # -- the misleading messages
    (["--policy", "<policy_empty>"], "is empty"),
    (["--task", "gsm8k", "--task-kwargs", '{"path": "<gsm8k_bad_line>"}'], "line 2"),
    (["--task", "gsm8k", "--task-kwargs", '{"path": "<gsm8k_bad_line>"}'], "bad.jsonl"),
    # -- more: numbers
    (["--temperature", "0"], "--temperature"),
    (["--temperature", "-1"], "--temperature"),
    (["--temperature", "inf"], "--temperature"),
    (["--top-p", "nan"], "--top-p"),
    (["--lr", "nan"], "--lr"),
    (["--lr", "-0.001"], "--lr"),
    (["--weight-decay", "-0.1"], "--weight-decay"),
    (["--warmup-steps", "-1"], "--warmup-steps"),
    (["--clip-low", "-0.1"], "--clip-low"),
    (["--clip-high", "-0.1"], "--clip-high"),
    (["--clip-high", "inf"], "--clip-high"),
    (["--dual-clip", "0.5"], "--dual-clip"),
    (["--dual-clip", "nan"], "--dual-clip"),
    (["--norm-constant", "0"], "--norm-constant"),
    (["--kl-coef", "-1"], "--kl-coef"),
    (["--max-grad-norm", "-1"], "--max-grad-norm"),
    (["--group-size", "0"], "--group-size"),
    (["--prompts-per-step", "0"], "--prompts-per-step"),
    (["--eval-problems", "-1"], "--eval-problems"),
    (["--sample-every", "-1"], "--sample-every"),
    (["--steps", "0"], "--steps"),
    # -- more: argparse (one line, no usage block)
    (["--steps", "x"], "--steps"),
    (["--lr", "fast"], "--lr"),
    (["--loss-agg", "bogus"], "--loss-agg"),
    (["--kl-kind", "k9"], "--kl-kind"),
    (["--bogus-flag", "1"], "--bogus-flag"),
    (["--steps"], "--steps"),
    # -- more: names and JSON
    (["--estimator", "nope"], "--estimator"),
    (["--task", "nope"], "--task"),
    (["--task", "<a_file>"], "--task"),
    (["--scorer", "nope"], "--scorer"),
    (["--policy", "nope"], "--policy"),
    (["--policy", "<a_file>"], "--policy"),
    (["--scorer-kwargs", '{"noise": 0.1}'], "--scorer-kwargs"),  # without --scorer
    (["--estimator-kwargs", "[1, 2]"], "--estimator-kwargs"),
    (["--estimator-kwargs", "{bad json"], "--estimator-kwargs"),
    (["--estimator-kwargs", '{"eps": "tiny"}'], "--estimator-kwargs"),
    (["--task-kwargs", "null"], "--task-kwargs"),
    (["--task-kwargs", '{"n_steps": 0}'], "--task-kwargs"),
    (["--task-kwargs", '{"n_steps": "two"}'], "--task-kwargs"),
    (["--scorer", "oracle", "--scorer-kwargs", '{"noise": 2}'], "--scorer-kwargs"),
    (["--scorer", "prm", "--scorer-kwargs", '{"path": "<policy_empty>"}'], "--scorer-kwargs"),
    (["--scorer", "judge", "--scorer-kwargs", '{"k": 0, "policy": "tiny"}'], "--scorer-kwargs"),
    (["--task", "gsm8k", "--task-kwargs", "{}"], "needs either path"),
    (["--task", "gsm8k", "--task-kwargs", '{"path": "<missing>"}'], "does not exist"),
    (["--task", "gsm8k", "--task-kwargs", '{"path": "<gsm8k_no_answer>"}'], "line 1"),
    (["--task", "gsm8k", "--task-kwargs", '{"path": "<gsm8k_no_hashes>"}'], "####"),
    (["--task", "gsm8k", "--task-kwargs", '{"path": "<gsm8k_not_parquet>"}'], "parquet"),
    (["--task", "gsm8k", "--task-kwargs", '{"path": "<gsm8k_empty>"}'], "holds no rows"),
    (["--task", "gsm8k", "--task-kwargs", '{"path": "<gsm8k_bad_line>", "test_fraction": "half"}'], "test_fraction"),
    (["--task-kwargs", '{"n_steps": "two"}'], "must be int"),
    (["--scorer", "oracle", "--scorer-kwargs", '{"hackable": "yes"}'], "must be bool"),
    (["--resume"], "--resume"),  # no checkpoint
]

OTHER_CASES = [
    (["sft", "--steps", "0"], "--steps"),
    (["sft", "--batch-size", "0"], "--batch-size"),
    (["sft", "--lr", "nan"], "--lr"),
    (["sft", "--lr", "0"], "--lr"),
    (["sft", "--eval-problems", "-1"], "--eval-problems"),
    (["sft", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["sft", "--task", "nope"], "--task"),
    (["sft", "--task-kwargs", '{"n_step": 2}'], "--task-kwargs"),
    (["sft", "--policy", "<policy_no_weights>"], "--policy"),
    (["sft", "--out-dir", "<a_file>/sft"], "--out-dir"),
    (["sft", "--out-dir", "<foreign_dir>"], "--out-dir"),
    (["demo", "--other-estimator", "nope"], "--other-estimator"),
    (["demo", "--out-root", "<foreign_dir>"], "--out-root"),
    (["demo", "--seed", "x"], "--seed"),
    (["inspect", "<missing>"], "does not exist"),
    (["inspect", "<run_missing_key>"], "advantages"),
    (["inspect", "<run_missing_key>"], "step_000001.json"),
    (["inspect", "<run_bad_json>"], "step_000001.json"),
    (["inspect", "<run_missing_key>", "--step", "7"], "available steps"),
    (["inspect", "<run_bad_config>"], "config.json"),
    (["inspect", "<foreign_dir>"], "no samples"),
    (["inspect"], "run_dir"),
    (["list", "--bogus"], "--bogus"),
    (["nope"], "nope"),
    ([], "command"),
]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    """Bad files and directories, by placeholder name."""
    root = tmp_path_factory.mktemp("bad")
    p = {name: root / name for name in ("policy_empty", "policy_no_weights", "policy_bad_json", "policy_unknown_type",
                                        "policy_bad_weights", "foreign_dir", "run_missing_key", "run_bad_json",
                                        "run_bad_config")}
    for d in p.values():
        d.mkdir()
    from creditlab.policy import load_policy

    tiny = load_policy("tiny")
    for name in ("policy_no_weights", "policy_bad_json", "policy_unknown_type", "policy_bad_weights"):
        tiny.save(p[name])
    (p["policy_no_weights"] / "model.safetensors").unlink()
    (p["policy_bad_json"] / "config.json").write_text('{"model_type": "llama",')
    (p["policy_unknown_type"] / "config.json").write_text('{"model_type": "no-such-architecture"}')
    (p["policy_bad_weights"] / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    (p["foreign_dir"] / "notes.txt").write_text("mine")
    rows = {"rows": [{"group": 0, "reward": 1.0, "prompt": "p", "tokens": ["a", "b"]}]}
    for name in ("run_missing_key", "run_bad_json", "run_bad_config"):
        (p[name] / "samples").mkdir()
        (p[name] / "samples" / "step_000001.json").write_text(json.dumps(rows))
    rows["rows"][0]["advantages"] = [0.5, -0.5]
    (p["run_bad_config"] / "samples" / "step_000001.json").write_text(json.dumps(rows))
    (p["run_bad_config"] / "config.json").write_text("{")
    (p["run_bad_json"] / "samples" / "step_000001.json").write_text('{"rows": [')
    p["a_file"] = root / "a_file"
    p["a_file"].write_text("x")
    p["missing"] = root / "missing"
    good = json.dumps({"question": "1 + 1?", "answer": "1 + 1 = 2\n#### 2"})
    files = {"gsm8k_binary": b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8,  # an image, renamed
             "gsm8k_bad_line": (good + "\n{\"question\": \"x\", \n").encode(),
             "gsm8k_no_answer": json.dumps({"question": "q"}).encode(),
             "gsm8k_no_hashes": json.dumps({"question": "q", "answer": "2"}).encode(),
             "gsm8k_not_parquet": b"PAR1 this is not parquet",
             "gsm8k_empty": b""}
    for name, data in files.items():
        suffix = ".parquet" if name == "gsm8k_not_parquet" else ".jsonl"
        p[name] = root / ("bad.jsonl" if name == "gsm8k_bad_line" else name + suffix)
        p[name].write_bytes(data)
    return p


def run_main(argv):
    """`main(argv)`'s exit code, whether it returns it or argparse raises SystemExit (as `sys.exit(main())` would)."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def check_one_line(rc, err, needle):
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, err
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    assert needle in lines[0], lines[0]
    assert "sentencepiece" not in err and "tiktoken" not in err


def fill(argv, paths):
    return [re.sub(r"<(\w+)>", lambda m: str(paths[m.group(1)]), a) for a in argv]


@pytest.mark.parametrize("options,needle", TRAIN_CASES, ids=[" ".join(c[0])[:60] for c in TRAIN_CASES])
def test_train_bad_option(tmp_path, capfd, paths, options, needle):
    args = list(BASE)
    for i in range(0, len(options)):  # an option already in BASE is replaced, others appended
        if options[i] in args and options[i].startswith("--") and i + 1 < len(options):
            args[args.index(options[i]) + 1] = options[i + 1]
            options = [*options[:i], None, None, *options[i + 2:]]
    args += [o for o in options if o is not None]
    if "--out-dir" not in args:
        args += ["--out-dir", str(tmp_path / "run")]
    capfd.readouterr()
    rc = run_main(["train", *fill(args, paths)])
    check_one_line(rc, capfd.readouterr().err, needle)
    assert not (tmp_path / "run").exists()  # refused before the run directory was made


@pytest.mark.parametrize("argv,needle", OTHER_CASES, ids=[" ".join(c[0])[:60] or "(none)" for c in OTHER_CASES])
def test_other_commands_bad_input(tmp_path, capfd, monkeypatch, paths, argv, needle):
    monkeypatch.chdir(tmp_path)
    capfd.readouterr()
    rc = run_main(fill(argv, paths))
    check_one_line(rc, capfd.readouterr().err, needle)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("argv,needle", [
    (["train", *BASE, "--temperature", "nan"], "--temperature"),
    (["train", *BASE, "--policy", "<policy_no_weights>"], "--policy"),
    (["sft", "--steps", "0"], "--steps"),
])
def test_real_process(tmp_path, paths, argv, needle):
    """The same contract seen from a shell: a separate process, its real stderr."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-m", "creditlab.cli", *fill(argv, paths), "--out-dir", str(tmp_path / "r")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    check_one_line(proc.returncode, proc.stderr, needle)
    assert proc.stdout == "" and not (tmp_path / "r").exists()
