# The two set-up commands of a fresh machine: `make demo` and `make test`.
# Each creates (or reuses) .venv and installs the package with what it needs
# (TensorFlow, and JAX and PyTorch CPU builds: the tests run on all three Keras backends).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test check lint venv clean bench bench-deps

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[cpu,test,jax,torch]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/vit-keras demo --out runs/demo

# Everything (CI runs this): the linter, then the whole suite in $(JOBS) processes (pytest-xdist; one module, or
# the modules sharing the demo training, per unit of work: the scheduler in tests/conftest.py).
JOBS ?= 2
test: lint
	$(PY) -m pytest -q -n $(JOBS)

# The fast lane: the linter and the tests not marked slow (no training, export or subprocess).
check: lint
	$(PY) -m pytest -q -n $(JOBS) -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# Inference benchmark against timm and the older vit-keras (benchmarks/inference.py).
# The old vit-keras has our import name, so it goes into a folder of its own.
OLD_VIT_KERAS := .bench/old-vit-keras
bench-deps: $(STAMP)
	$(PY) -m pip install -q -e '.[cpu,bench]'
	test -d $(OLD_VIT_KERAS) || $(PY) -m pip install -q --no-deps --target $(OLD_VIT_KERAS) \
		vit-keras==0.2.0 tf-keras==2.21.0 validators==0.36.0 opencv-python-headless==5.0.0.93

bench: bench-deps
	$(PY) benchmarks/inference.py

clean:
	rm -rf $(VENV) runs .bench
