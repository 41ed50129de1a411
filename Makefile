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

# Demo cohort size (override: make demo DEMO_N=2000 DEMO_K=8). 1,000 participants give ~200 CBP events, enough
# for the model checks (>= 10 events per variable), and the whole demo takes ~15 min on 2 cores.
DEMO_N ?= 1000
DEMO_K ?= 4
DEMO_SEED ?= 20140501
DEMO_FAULTS ?= 0.02

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

$(DAGSTER_HOME)/dagster.yaml:
	@mkdir -p $(DAGSTER_HOME)
	cp deploy/dagster.local.yaml $@

# The main job on the simulated cohort: simulate (once), then sensor + every batch + cohort refresh through
# Dagster against the persistent instance in $(DAGSTER_HOME) (`make dev` shows the runs afterwards).
demo: $(STAMP) $(DAGSTER_HOME)/dagster.yaml
	$(VENV)/bin/cbp synth --participants $(DEMO_N) --deliveries $(DEMO_K) --seed $(DEMO_SEED) --faults $(DEMO_FAULTS) --if-absent
	$(PY) -m assets.runner
	@echo "Landing zone: $(CBP_DATA_ROOT)/landing   warehouse: $(CBP_DATA_ROOT)/warehouse/cbp.duckdb"
	@echo "Report: $$($(PY) -c 'import json,sys; print(json.load(open(sys.argv[1]))["path"])' $(CBP_DATA_ROOT)/published/latest.json 2>/dev/null || echo '(none: see the failures above)')/report.html"
	@echo "Lineage: $(VENV)/bin/cbp lineage    accuracy: $(VENV)/bin/cbp accuracy"
	@echo "Open the UI: make dev   (then http://127.0.0.1:$${DAGSTER_PORT:-3000})"

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/run.py

dev: $(STAMP) $(DAGSTER_HOME)/dagster.yaml
	$(VENV)/bin/dagster dev -w workspace.yaml -h 127.0.0.1 -p $${DAGSTER_PORT:-3000}

clean:
	rm -rf $(VENV) .pytest_cache
