# fgbg: two commands for everything (see README.md).
#   make demo   set up, then run the course's notebooks on the mini world (runs/demo/)
#   make test   set up, then the unit tests and nbval on the notebooks
# For who edits the lessons: `make notebooks` (after editing notebooks/py/*.py or the notebooks),
# `make lessons` (the rendered lessons as a static site, docs/lessons/html/).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU wheel of torch lies on this machine's disk; on a GPU machine run e.g.
#   make setup TORCH="torch --index-url https://download.pytorch.org/whl/cu124"
TORCH  ?= torch==2.13.0
PARAMS ?= params/demo.yaml
STAMP  := $(VENV)/.fgbg-installed

.PHONY: setup demo test test-units test-nbval test-fast test-bf16 notebooks lessons teaching-model bench clean help

help:
	@sed -n '2,6p' Makefile

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[dev]"
	@touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/python -m fgbg.course run -f $(PARAMS)

# The unit tests and nbval run side by side, one torch thread each (make -j2; each one's output
# is printed when it ends): 14 min 0 s from a fresh clone on a 2-core CPU, where one after the
# other took 14 min 26 s and 15 min 16 s the same day. One thread also makes the
# checked numbers independent of the machine's core count: `make notebooks` made them with one
# thread (float order: with two, refined M reads e.g. 66.1 instead of 65.7).
# TEST_WORKERS: pytest-xdist processes for the unit tests (more where there are more cores).
TEST_WORKERS ?= 1
NBVAL_ENV := OMP_NUM_THREADS=1 FGBG_PROGRESS=0 TQDM_DISABLE=1 FGBG_OUT_DIR=runs/nbval
# nbval runs the notebooks with their parameters cells' defaults, writing to runs/nbval
# (FGBG_OUT_DIR) so that it never reuses or touches runs/demo. FGBG_PROGRESS=0 (fgbg.runs.PROGRESS_ENV):
# a batch run, so no progress widgets (nbval reads a cell's messages only after it ends and can
# lose "idle" among thousands) and no image-browser widget (fgbg.viz.browse draws a static figure).
test: setup
	@$(MAKE) --no-print-directory -j2 --output-sync=target test-units test-nbval

test-units: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) tests

test-nbval: setup
	rm -rf runs/nbval
	$(NBVAL_ENV) $(BIN)/python -m pytest -q -p no:cacheprovider --nbval-lax --nbval-cell-timeout 900 \
		--nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg notebooks/0*.ipynb

# Alone on the machine: one one-thread worker per core.
test-fast: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n auto -m "not slow" tests

# The CUB-params notebooks with the pipeline in bf16 on the CPU (minutes; not in `make test`).
test-bf16: setup
	FGBG_TEST_CPU_BF16=1 $(BIN)/python -m pytest -q tests/test_cub_params_course.py

# Each lesson is a jupytext pair: notebooks/NAME.ipynb and notebooks/py/NAME.py (notebooks/jupytext.toml;
# the solutions: notebooks/solutions/). This syncs each pair (the file edited last gives its cells to
# the other), runs every notebook headless (runs/build/), keeps only the outputs of the check cells in
# notebooks/ (nbval compares them) and writes the executed lessons to docs/lessons/*.ipynb (under
# 500 KB each). About 16 minutes on a 2-core CPU. It runs the notebooks with one torch thread, as
# nbval does in `make test`: the checked numbers depend on the thread count (float order).
notebooks: setup
	$(BIN)/python tools/notebooks.py refresh

# The rendered lessons as a static site, docs/lessons/html/index.html (nbconvert; git-ignored), from
# the executed lessons in docs/lessons/; runs `make notebooks` first where those ran other code.
lessons: setup
	@$(BIN)/python -c "import nbconvert" 2>/dev/null || $(BIN)/python -m pip install -q -e ".[docs]"
	$(BIN)/python tools/notebooks.py lessons

# Retrain the teaching model from scratch (see docs/teaching_model.md for times).
teaching-model: setup
	$(BIN)/python -m fgbg.teaching_model train --work data/teaching-train --save-to fgbg/assets/teaching-model

# The smoke test of benchmarks/bench_gpu.py on the CPU (under a minute). On a GPU:
#   .venv/bin/python benchmarks/bench_gpu.py --json runs/bench/<card>.json --profile   (benchmarks/README.md)
bench: setup
	$(BIN)/python benchmarks/bench_gpu.py --cpu --json runs/bench/cpu.json

clean:
	rm -rf runs/nbval runs/build docs/lessons/html .pytest_cache
