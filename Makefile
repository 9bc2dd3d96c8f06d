# `make train` runs the main job on the embedded default; `make test` runs the test suite.
# Both create .venv/ (package installed editable with the test extra) on first use.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
JAX_ENV := JAX_PLATFORMS=cpu ALLOW_MULTIPLE_LIBTPU_LOAD=1 TPU_ACCELERATOR_TYPE=v5litepod-4 TPU_WORKER_HOSTNAMES=localhost TPU_SKIP_MDS_QUERY=1

.PHONY: train test bench venv

$(STAMP): setup.cfg pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

train: $(STAMP)
	$(JAX_ENV) $(VENV)/bin/qwen35 train $(ARGS)

test: $(STAMP)
	$(JAX_ENV) $(VENV)/bin/python -m pytest -n 2 --dist loadfile tests $(PYTEST_ARGS)
