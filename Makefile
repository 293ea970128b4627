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
	$(PY) -m pip install --quiet -e ".[dev,ray]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m zsad report notebooks/00_quickstart.ipynb --out $(REPORT) \
		-p backbone $(BACKBONE) $(if $(WEIGHTS),-p weights $(WEIGHTS)) \
		$(if $(IMAGE_SIZE),-p image_size $(IMAGE_SIZE)) $(if $(DATA),-p data_root $(DATA))

# Every notebook runs once on the embedded world through nbval in lax mode: each cell must execute without an
# error, but no stored output is compared with the new one. The outputs are figures and measured numbers that
# vary with thread count, BLAS and library versions, so the notebooks are committed without outputs and none
# are compared; the behaviour behind the numbers is asserted in tests/ (with tolerances where it is numeric).
# -rs prints each skip's reason (e.g. the browser test names the missing playwright or Chromium).
test: install
	$(PY) -m ruff check zsad tests benchmarks
	$(PY) -m pytest tests notebooks --nbval-lax -q -rs

test-all: install
	$(PY) -m pytest tests notebooks --nbval-lax -q -rs -m "slow or not slow"

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
