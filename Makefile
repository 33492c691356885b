# deepcontrol: make demo | make test | make lint | make reproduce-fig1 | make fig1-smoke | make bench
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# By default every target runs in .venv, made and kept up to date by `make install`. PY names
# another interpreter whose environment already has the dependencies (a cluster's conda env,
# a GPU image): `make bench PY=python3`. Then no venv is made and the package runs from src/.
ifeq ($(origin PY),command line)
SETUP :=
export PYTHONPATH := $(CURDIR)/src$(if $(PYTHONPATH),:$(PYTHONPATH))
else
PY := $(BIN)/python
SETUP := install
endif

.PHONY: install demo test lint clean reproduce-fig1 fig1-smoke bench

# make reproduce-fig1 [DATA=cityscapes|camvid] [ARGS="epochs=30 ..."] [LAUNCHER=gpu_pool|basic|slurm]
#                     [RUNS=outputs/$(DATA)] [RESULTS=results/$(DATA)] [SEEDS=0,1,2]
DATA ?= cityscapes
ARGS ?=
# SEEDS=0,1,2 trains every run once per seed; each panel then draws a setting's mean over its
# seeds, shaded from the lowest to the highest, and the table adds the means
SEEDS ?=
FIG1_ARGS = $(ARGS)$(if $(SEEDS), seed=$(SEEDS))
LAUNCHER ?= gpu_pool
RUNS ?= outputs/$(DATA)
RESULTS ?= results/$(DATA)
# make fig1-smoke: the same pipeline on a tiny synthetic Cityscapes with narrow nets (model.width=16), on the CPU
SMOKE_OUT ?= outputs/fig1-smoke
SMOKE_RESULTS ?= results/smoke
SMOKE_ARGS := data=synthetic data.root=$(SMOKE_OUT)/data data.cache_dir=$(SMOKE_OUT)/cache \
	data.synthetic.num_train=8 data.synthetic.num_val=4 data.height=32 data.width=64 \
	model.width=16 epochs=3 device=cpu logger=none train.progress=false

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/.installed

# BN, then AGC, on the embedded synthetic Cityscapes (written on first use), on the CPU.
demo: $(SETUP)
	WANDB_SILENT=true $(PY) -m deepcontrol.train --multirun experiment=demo norm=bn,agc
	$(PY) scripts/compare_runs.py --latest outputs/demo

# Every run of Figure 1 (each once; finished runs are skipped, unfinished ones resume), then
# runs.csv, the figure, the λ figure and the table in $(RESULTS). The cache is checked first.
reproduce-fig1: $(SETUP)
	$(PY) scripts/prepare_data.py data=$(DATA) $(ARGS)
	$(PY) -m deepcontrol.train --multirun experiment=fig1 data=$(DATA) $(FIG1_ARGS) \
		hydra/launcher=$(LAUNCHER) hydra.sweep.dir=$(RUNS)
	$(PY) scripts/collect_results.py $(RUNS) $(RESULTS)
	$(PY) scripts/plot_fig1.py $(RESULTS) data=$(DATA) $(FIG1_ARGS)

fig1-smoke: $(SETUP)
	$(PY) -m deepcontrol.train --multirun experiment=fig1 $(SMOKE_ARGS) \
		hydra.sweep.dir=$(SMOKE_OUT)/runs
	$(PY) scripts/collect_results.py $(SMOKE_OUT)/runs $(SMOKE_RESULTS)
	$(PY) scripts/plot_fig1.py $(SMOKE_RESULTS) $(SMOKE_ARGS)

# Training-step speed and memory per norm, batch, precision and mode: results/benchmark.md
# (the full grid needs a CUDA GPU; on a CPU a reduced grid checks the code).
# BENCH_ARGS passes options on, e.g. BENCH_ARGS="--time-limit 420" within a job's limit.
# BENCH_OUT=DIR writes the report there; by default results/ on a GPU and, for the reduced
# CPU grid, outputs/benchmark-reduced/ (its numbers are no result).
bench: $(SETUP)
	$(PY) scripts/benchmark.py $(if $(BENCH_OUT),--out $(BENCH_OUT)) $(BENCH_ARGS)

test: $(SETUP)
	WANDB_MODE=disabled $(PY) -m pytest -q

lint: $(SETUP)
	$(PY) -m ruff check src tests scripts notebooks results
	$(PY) -m ruff format --check src tests scripts notebooks results

clean:
	rm -rf outputs cache data/synthetic-cityscapes .pytest_cache
