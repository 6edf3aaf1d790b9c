# Two entry points on a fresh machine: `make demo` and `make test`. Both create .venv and install into it.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install -q --disable-pip-version-check
STAMP  := $(VENV)/.installed

# Framework integrations live in their own environments: verl 0.9.1 pins transformers<5.11 while TRL 1.16
# pulls transformers 5.23, so neither can share .venv (nor each other's).
VENV_TRL   := .venv-trl
STAMP_TRL  := $(VENV_TRL)/.installed
VENV_VERL  := .venv-verl
STAMP_VERL := $(VENV_VERL)/.installed

.PHONY: demo test test-core test-trl test-verl lint lock clean

# Installs are locked: requirements/<env>.lock.txt pins every package (written by requirements/lock.py from a working
# environment; tests/test_lock.py fails when a lock and pyproject.toml disagree). torch comes first, alone, so that
# pip takes the local CPU wheel and never a CUDA build; the lock is then installed exactly (--no-deps: no resolver
# run), and creditlab itself editable without dependencies.
$(STAMP): pyproject.toml Makefile requirements/core.lock.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) --no-deps -r requirements/core.lock.txt
	$(PIP) --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/creditlab demo

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests

test: test-core test-trl test-verl

test-core: $(STAMP) lint
	$(PY) -m pytest -q

$(STAMP_TRL): pyproject.toml Makefile requirements/trl.lock.txt
	$(PYTHON) -m venv $(VENV_TRL)
	$(VENV_TRL)/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
	$(VENV_TRL)/bin/python -m pip install -q --disable-pip-version-check --no-deps -r requirements/trl.lock.txt
	$(VENV_TRL)/bin/python -m pip install -q --disable-pip-version-check --no-deps -e .
	touch $(STAMP_TRL)

# --runslow: the integration suites' slow tests (two-process torchrun, the real verl training step) run in CI.
# Globs, so that a new test file of either suite runs without editing this list (test_trl_multiturn.py was missed).
test-trl: $(STAMP_TRL)
	$(VENV_TRL)/bin/python -m pytest -q --runslow tests/integrations/test_trl*.py tests/integrations/test_vs_trl*.py

$(STAMP_VERL): pyproject.toml Makefile requirements/verl.lock.txt
	$(PYTHON) -m venv $(VENV_VERL)
	$(VENV_VERL)/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
	$(VENV_VERL)/bin/python -m pip install -q --disable-pip-version-check --no-deps -r requirements/verl.lock.txt
	$(VENV_VERL)/bin/python -m pip install -q --disable-pip-version-check --no-deps -e .
	touch $(STAMP_VERL)

# creditlab's verl tests run in their own pytest process: verl's own TestRegisterAdvEst clears verl's estimator
# registry without restoring it, which would unregister every creditlab_* estimator (docs/integrations.md).
test-verl: $(STAMP_VERL)
	$(VENV_VERL)/bin/python -m pytest -q --runslow tests/integrations/test_verl*.py

# Rewrite the three locks from the installed environments (after moving a pin with pip install -U in one of them).
lock: $(STAMP) $(STAMP_TRL) $(STAMP_VERL)
	$(PY) requirements/lock.py core > requirements/core.lock.txt
	$(VENV_TRL)/bin/python requirements/lock.py trl > requirements/trl.lock.txt
	$(VENV_VERL)/bin/python requirements/lock.py verl > requirements/verl.lock.txt

clean:
	rm -rf $(VENV) $(VENV_TRL) $(VENV_VERL) runs .pytest_cache
