"""The locks in requirements/ agree with pyproject.toml and with the Makefile that installs them.

Every dependency pyproject names for an environment (its `dependencies` plus the extras the lock's header lists)
must be pinned in that lock at a version its specifier admits; every lock line is an exact `name==version` pin;
torch is the local CPU release; and the Makefile installs each lock into its environment without a resolver run.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python >= 3.11")
ROOT = Path(__file__).resolve().parent.parent
LOCKS = {"core": ".venv", "trl": ".venv-trl", "verl": ".venv-verl"}


def read_lock(path: Path) -> tuple[dict[str, str], dict[str, list[str]]]:
    """(canonical name -> pinned version, header fields `# key: a,b`)."""
    pins: dict[str, str] = {}
    header: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            m = re.match(r"#\s*(extras|no-deps):\s*(.*)$", line)
            if m:
                header[m.group(1)] = [x.strip() for x in m.group(2).split(",") if x.strip()]
            continue
        if not line.strip():
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)", line.strip())
        assert m, f"{path.name}: not an exact pin: {line!r}"
        name = canonicalize_name(m.group(1))
        assert name not in pins, f"{path.name}: {name} pinned twice"
        pins[name] = m.group(2)
    return pins, header


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


@pytest.mark.parametrize("env", sorted(LOCKS))
def test_lock_pins_every_pyproject_dependency_within_its_specifier(env):
    pins, header = read_lock(ROOT / "requirements" / f"{env}.lock.txt")
    project = pyproject()
    assert "extras" in header, f"{env}.lock.txt has no '# extras:' header"
    unknown = set(header["extras"]) - set(project["optional-dependencies"])
    assert not unknown, f"{env}.lock.txt names extras pyproject.toml lacks: {sorted(unknown)}"
    wanted = list(project["dependencies"])
    for extra in header["extras"]:
        wanted += project["optional-dependencies"][extra]
    problems = []
    for text in wanted:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        if name not in pins:
            problems.append(f"{req.name} (pyproject: {text!r}) is not in {env}.lock.txt")
        elif not req.specifier.contains(Version(pins[name]), prereleases=True):
            problems.append(f"{req.name}=={pins[name]} in {env}.lock.txt does not satisfy pyproject's {text!r}")
    for name in header.get("no-deps", []):
        if canonicalize_name(name) not in pins:
            problems.append(f"{name} (installed --no-deps) is not in {env}.lock.txt")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("env", sorted(LOCKS))
def test_lock_keeps_the_local_cpu_torch(env):
    pins, _ = read_lock(ROOT / "requirements" / f"{env}.lock.txt")
    assert pins.get("torch") == "2.13.0", "torch must stay the local CPU wheel 2.13.0 (no local label in the lock)"
    assert "creditlab" not in pins, "the project itself is installed editable, not from the lock"
    cuda = sorted(n for n in pins if n.startswith("nvidia-") or n == "triton")
    assert not cuda, f"{env}.lock.txt pins CUDA packages {cuda}: a resolver pulled a CUDA torch"


def test_makefile_installs_each_lock_exactly():
    text = (ROOT / "Makefile").read_text()
    for env, venv in LOCKS.items():
        lock = f"requirements/{env}.lock.txt"
        target = re.search(rf"^\$\(STAMP{'' if env == 'core' else '_' + env.upper()}\):([^\n]*)\n((?:\t[^\n]*\n)+)",
                           text, flags=re.M)
        assert target, f"Makefile: no install stamp for {venv}"
        deps, recipe = target.group(1), target.group(2)
        assert lock in deps, f"Makefile: {venv}'s stamp does not depend on {lock}"
        assert re.search(rf"--no-deps -r {re.escape(lock)}", recipe), f"Makefile: {venv} is not installed from {lock}"
        assert re.search(r"--no-deps -e \.", recipe), f"Makefile: creditlab is not installed --no-deps in {venv}"
        assert "torch==2.13.0" in recipe.splitlines()[1], f"Makefile: {venv} must install torch==2.13.0 first"
