# Set-up and everyday commands. Every target creates the environment first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: env demo test test-all docs bench lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch and torchvision first, pinned to a pair that imports together
	$(PY) -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install --quiet -e ".[test,lint,docs]"
	touch $(STAMP)

env: $(STAMP)

demo: $(STAMP)
	MPLBACKEND=agg $(PY) -m experiments.noise_during_training.run --quick

test: $(STAMP)  # the fast subset for development: everything but `slow`
	OMP_NUM_THREADS=1 MPLBACKEND=agg $(PY) -m pytest -n 2 -q -m "not slow"

test-all: $(STAMP)  # the full suite, what CI runs (README's test command)
	OMP_NUM_THREADS=1 MPLBACKEND=agg $(PY) -m pytest -n 2 -q

docs: $(STAMP)
	$(PY) -m sphinx -W -b html docs docs/_build/html

bench: $(STAMP)
	$(PY) -m pip install --quiet -e ".[bench]"
	$(PY) -m experiments.benchmarks.ggn.run
	$(PY) -m experiments.benchmarks.hessianfree.run

lint: $(STAMP)
	$(PY) -m ruff check vivitlib tests experiments docs/examples
	$(PY) -m ruff format --check vivitlib tests experiments docs/examples

clean:
	rm -rf $(VENV) docs/_build .pytest_cache
