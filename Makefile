# Two entry points for a fresh machine with only Python: `make demo` and `make test` (.ci/run calls the latter).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

# Long CPU runs grow through glibc's allocator without these (see zsad/tiny/train.py).
export MALLOC_MMAP_THRESHOLD_ = 1048576
export MALLOC_TRIM_THRESHOLD_ = 1048576
export MALLOC_ARENA_MAX = 2
export PYDEVD_DISABLE_FILE_VALIDATION = 1

# Demo parameters: the embedded world by default; e.g. `make demo BACKBONE=ViT-L-14-336 WEIGHTS=openai IMAGE_SIZE=518`.
BACKBONE ?= zsad-tiny
WEIGHTS ?=
IMAGE_SIZE ?=
DATA ?=
REPORT ?= reports/quickstart

.PHONY: install demo test test-all lint notebooks tiny clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev,ray,export]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m zsad report notebooks/00_quickstart.ipynb --out $(REPORT) \
		-p backbone $(BACKBONE) $(if $(WEIGHTS),-p weights $(WEIGHTS)) \
		$(if $(IMAGE_SIZE),-p image_size $(IMAGE_SIZE)) $(if $(DATA),-p data_root $(DATA))

# Every notebook runs once, in tests/test_notebooks.py, the way `zsad report` renders it (papermill, then HTML),
# at the small configuration that ZSAD_NOTEBOOK_SCALE=ci selects in each notebook's parameters cell (without the
# variable a notebook runs its teaching defaults). Each notebook ends with an assertion on its headline result on
# the embedded world, and the test fails on any stderr block or progress-bar output in the executed notebook.
# No stored output is compared: the notebooks are committed without outputs (their numbers vary with threads,
# BLAS and library versions). -rs prints each skip's reason (e.g. notebook 10 without its dataset);
# --durations=25 keeps the cost of the slowest cases in every CI log.
test: install
	$(PY) -m ruff check zsad tests benchmarks
	$(PY) -m pytest tests -q -rs --durations=25

test-all: install
	$(PY) -m pytest tests -q -rs -m "slow or not slow"

lint: install
	$(PY) -m ruff check zsad tests benchmarks
	$(PY) -m ruff format --check zsad tests benchmarks

# Every notebook rendered on the embedded world by the plan notebooks/plans/embedded.yaml: reports/embedded/<run>/,
# summary.{csv,md,png} and reports/index.html. Finished runs are skipped; FORCE=1 re-executes, JOBS=N runs N at once.
JOBS ?= 1
notebooks: install
	$(PY) -m zsad report notebooks/plans/embedded.yaml --jobs $(JOBS) $(if $(FORCE),--force)

# Rebuild the shipped zsad-tiny weights (seeded; about 30 minutes on 2 CPU cores), then measure its card.
tiny: install
	$(PY) -m zsad.tiny train
	$(PY) -m zsad.tiny measure

clean:
	rm -rf reports/*/ .pytest_cache
