# cbp-platform: every target builds or reuses .venv with the pinned dependencies itself.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PIP_VERSION := 26.3
# The demo cohort's scan format: nifti (default) or dicom (zipped DICOM stations, converted and stitched by the
# platform: make demo DEMO_FORMAT=dicom). A DICOM demo gets its own data root, data-dicom/, unless CBP_DATA_ROOT is set.
DEMO_FORMAT ?= nifti
ifeq ($(DEMO_FORMAT),dicom)
export CBP_DATA_ROOT ?= $(CURDIR)/data-dicom
endif
export CBP_DATA_ROOT ?= $(CURDIR)/data
export GX_ANALYTICS_ENABLED := False
export DAGSTER_HOME ?= $(CBP_DATA_ROOT)/dagster_home

# Demo cohort size (override: make demo DEMO_N=2000 DEMO_K=8). 1,000 participants give ~200 CBP events, enough
# for the model checks (>= 10 events per variable), and the whole demo takes ~15 min on 2 cores.
DEMO_N ?= 1000
DEMO_K ?= 4
DEMO_SEED ?= 20140501
DEMO_FAULTS ?= 0.02

.PHONY: venv sysdeps demo test test-fast test-ui bench dev clean

venv: $(STAMP)

# requirements.lock pins every package (pip --no-deps skips the resolver: a fresh install takes ~1.5 min,
# a re-run with an unchanged lock nothing at all). torch==2.13.0 is the CPU build.
$(STAMP): requirements.lock pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "pip==$(PIP_VERSION)"
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -r requirements.lock
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $(STAMP)

# The instance for the deployment profile (CBP_DEPLOYMENT: local by default; production needs CBP_PG_*).
$(DAGSTER_HOME)/dagster.yaml: | $(STAMP)
	$(VENV)/bin/cbp instance init --dagster-home $(DAGSTER_HOME)

# System packages the browser and database tests need: Debian's chromium (Playwright drives it; no browser
# download) and postgresql (the tests start their own server in a temp directory). Installed when missing.
SYSDEPS_STAMP := $(VENV)/.sysdeps
sysdeps: $(SYSDEPS_STAMP)
$(SYSDEPS_STAMP): | $(STAMP)
	@missing=""; command -v chromium >/dev/null || missing="$$missing chromium"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO="sudo"; \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing >/dev/null \
	  || { $$SUDO apt-get update -q >/dev/null && \
	       $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing >/dev/null; }; \
	fi
	@touch $@

# The main job on the simulated cohort: simulate (once), then sensor + every batch + cohort refresh through
# Dagster against the persistent instance in $(DAGSTER_HOME) (`make dev` shows the runs afterwards).
demo: $(STAMP) $(DAGSTER_HOME)/dagster.yaml
	$(VENV)/bin/cbp synth --participants $(DEMO_N) --deliveries $(DEMO_K) --seed $(DEMO_SEED) --faults $(DEMO_FAULTS) --format $(DEMO_FORMAT) --if-absent
	$(PY) -m orchestration.runner
	@echo "Landing zone: $(CBP_DATA_ROOT)/landing   warehouse: $(CBP_DATA_ROOT)/warehouse/cbp.duckdb"
	@echo "Report: $$($(PY) -c 'import json,sys; import os; print(os.path.join(os.path.dirname(os.path.dirname(sys.argv[1])), json.load(open(sys.argv[1]))["path"]))' $(CBP_DATA_ROOT)/published/latest.json 2>/dev/null || echo '(none: see the failures above)')/report.html"
	@echo "Lineage: $(VENV)/bin/cbp lineage    accuracy: $(VENV)/bin/cbp accuracy"
	@echo "Open the UI: make dev   (then http://127.0.0.1:$${DAGSTER_PORT:-3000})"

# The whole suite, browser (tests/ui) and Postgres (tests/deploy) tests included: with the system packages
# installed, a missing one is a failure, not a skip. Two pytest processes side by side, one stream of work per core
# (tools/run_tests.py, tests/conftest.py): the training of the default MONAI model, and everything else.
test: $(STAMP) $(SYSDEPS_STAMP)
	CBP_REQUIRE_SYSTEM_TESTS=1 $(PY) tools/run_tests.py -q

# The unit layer alone (no Dagster job, no training, no browser, no PostgreSQL server: tests/conftest.py gives
# every test its layer markers), in about a minute; no system packages needed.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m unit

# The browser tests alone (screenshots in artifacts/ui/).
test-ui: $(STAMP) $(SYSDEPS_STAMP)
	CBP_REQUIRE_SYSTEM_TESTS=1 $(PY) -m pytest -q -m ui

# Every benchmark, or some of them: make bench BENCH="warehouse analysis". The warehouse benchmark starts its
# own PostgreSQL server (Debian's postgresql, installed by sysdeps).
BENCH ?=
bench: $(STAMP) $(SYSDEPS_STAMP)
	$(PY) benchmarks/run.py $(BENCH)

dev: $(STAMP) $(DAGSTER_HOME)/dagster.yaml
	$(VENV)/bin/dagster dev -w workspace.yaml -h 127.0.0.1 -p $${DAGSTER_PORT:-3000}

clean:
	rm -rf $(VENV) .pytest_cache
