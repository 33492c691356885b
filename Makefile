# deepcontrol: make demo | make test | make lint
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test lint clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/.installed

# BN, then AGC, on the embedded synthetic Cityscapes (written on first use), on the CPU.
demo: install
	WANDB_SILENT=true $(BIN)/deepcontrol-train --multirun experiment=demo norm=bn,agc
	$(BIN)/python scripts/compare_runs.py --latest outputs/demo

test: install
	WANDB_MODE=disabled $(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check src tests scripts
	$(BIN)/ruff format --check src tests scripts

clean:
	rm -rf outputs cache data/synthetic-cityscapes .pytest_cache
