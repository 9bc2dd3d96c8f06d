# `make train` runs the main job on the embedded default (runtime dependencies only); `make test` runs the test
# suite (adds the test extra: torch/transformers oracles, the GCS emulator, libtpu for AOT compiles). Both create
# .venv/ on first use and install the exact versions of requirements/constraints.txt.
# `make constraints` refreshes that file from the current .venv (after upgrading a package there on purpose).
PYTHON ?= python3
VENV := .venv
CONSTRAINTS := requirements/constraints.txt
PIP := $(VENV)/bin/pip install -q -c $(CONSTRAINTS)
JAX_ENV := JAX_PLATFORMS=cpu ALLOW_MULTIPLE_LIBTPU_LOAD=1 TPU_ACCELERATOR_TYPE=v5litepod-4 TPU_WORKER_HOSTNAMES=localhost TPU_SKIP_MDS_QUERY=1

.PHONY: train test venv constraints

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.runtime: setup.cfg pyproject.toml $(CONSTRAINTS) | $(VENV)/bin/python
	$(PIP) -e .
	touch $@

$(VENV)/.test: $(VENV)/.runtime
	$(PIP) -e '.[test]'
	touch $@

venv: $(VENV)/.runtime

train: $(VENV)/.runtime
	$(JAX_ENV) $(VENV)/bin/qwen35 train $(ARGS)

# Tests compile hundreds of toy programs: XLA's CPU backend at -O0 compiles them ~35% faster and they run in ms anyway.
test: $(VENV)/.test
	$(JAX_ENV) XLA_FLAGS="--xla_backend_optimization_level=0 $(XLA_FLAGS)" $(VENV)/bin/python -m pytest -n 2 --dist loadfile tests $(PYTEST_ARGS)

constraints:
	{ echo "# Exact versions for make/CI (pip install -c). Refresh: make constraints"; \
	  $(VENV)/bin/pip freeze --exclude-editable | grep -v '^qwen35-jax'; } > $(CONSTRAINTS)
