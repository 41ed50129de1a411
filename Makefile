# cbp-platform: every target builds or reuses .venv with the pinned dependencies itself.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PIP_VERSION := 26.3
export CBP_DATA_ROOT ?= $(CURDIR)/data
export GX_ANALYTICS_ENABLED := False
export DAGSTER_HOME ?= $(CBP_DATA_ROOT)/dagster_home

# Demo cohort size (override: make demo DEMO_N=500 DEMO_K=2)
DEMO_N ?= 600
DEMO_K ?= 3
DEMO_SEED ?= 20140501

.PHONY: venv demo test bench dev clean

venv: $(STAMP)

# requirements.lock pins every package (pip --no-deps skips the resolver: a fresh install takes ~1.5 min,
# a re-run with an unchanged lock nothing at all). torch==2.13.0 is the CPU build.
$(STAMP): requirements.lock pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "pip==$(PIP_VERSION)"
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -r requirements.lock
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/cbp synth --participants $(DEMO_N) --deliveries $(DEMO_K) --seed $(DEMO_SEED) --if-absent
	@echo "Landing zone: $(CBP_DATA_ROOT)/landing   ground truth: $(CBP_DATA_ROOT)/truth"

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/run.py

dev: $(STAMP)
	@mkdir -p $(DAGSTER_HOME)
	$(VENV)/bin/dagster dev -w workspace.yaml -h 127.0.0.1 -p $${DAGSTER_PORT:-3000}

clean:
	rm -rf $(VENV) .pytest_cache
