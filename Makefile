# Two commands a user needs: `make demo` and `make test`. Both set up .venv on first use, with the exact
# versions in requirements.lock; `make lock` re-resolves that file on purpose (see README, "Dependencies").
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)
# Prefect's database and cached results live in the project, so the UI shows the demo's runs.
export PREFECT_HOME ?= $(CURDIR)/.prefect
PREFECT_URL ?= http://127.0.0.1:4200/api
LOCK := requirements.lock
# Install markers are named after the contents of pyproject.toml and the lock, not their dates, so a fresh
# clone (new mtimes) or another VENV= reinstalls only when the dependencies really changed.
DEPS_HASH := $(shell cat pyproject.toml $(wildcard $(LOCK)) | sha256sum | cut -c1-12)

.PHONY: demo test bench benchmark world install lock prefect-server serve mlflow-ui

$(PY):
	python3 -m venv $(VENV)

# uv installs the same lock (plain constraints) from its shared wheel cache, several times faster than pip
# (docs/benchmarks.md, "Install"); pip when uv is not on PATH. Both compile bytecode at install (uv only when
# asked): a stage process then never compiles the stack's sources, which costs seconds per stage wherever
# PYTHONDONTWRITEBYTECODE is set or the venv is read-only.
UV := $(shell command -v uv 2>/dev/null)
INSTALL := $(if $(UV),$(UV) pip install --compile-bytecode --python $(PY),$(PY) -m pip install) --quiet -c $(LOCK)

$(VENV)/.runtime-$(DEPS_HASH): | $(PY)
	$(INSTALL) -e . && rm -f $(VENV)/.runtime-* && touch $@

$(VENV)/.dev-$(DEPS_HASH): $(VENV)/.runtime-$(DEPS_HASH)
	$(INSTALL) -e '.[dev]' && rm -f $(VENV)/.dev-* && touch $@

install: $(VENV)/.runtime-$(DEPS_HASH)

# Resolve every runtime and dev dependency afresh in a throw-away venv and write the exact versions.
lock:
	rm -rf .lock-venv && python3 -m venv .lock-venv
	.lock-venv/bin/python -m pip install --quiet -e '.[dev]'
	{ echo "# Exact versions for Python $$(.lock-venv/bin/python -c 'import platform; print(platform.python_version())'),"; \
	  echo "# resolved by 'make lock' (pip install -e .[dev], then pip freeze). Used as pip constraints."; \
	  .lock-venv/bin/python -m pip freeze --exclude-editable | grep -v '^\(pip\|setuptools\|wheel\)=='; } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK) && rm -rf .lock-venv

# One Prefect server for every stage (started once, detached, then reused; `python -m orchestration.server --stop`).
demo: $(VENV)/.runtime-$(DEPS_HASH)
	@[ -n "$$PREFECT_API_URL" ] || echo "Prefect API (UI without /api): $$($(PY) -m orchestration.server)"
	$(BIN)/dvc repro
	$(PY) -m orchestration.summary

test: $(VENV)/.dev-$(DEPS_HASH)
	$(PY) -m pytest -q

# Every bench/*_bench.py runs (or BENCHES="sampling peers ..."); each writes its figures to
# bench/results/<name>.json and prints them; then bench/report.py prints every goal's row and every peer row.
BENCHES ?= $(patsubst bench/%_bench.py,%,$(wildcard bench/*_bench.py))
bench: $(VENV)/.dev-$(DEPS_HASH)
	for b in $(BENCHES); do $(PY) bench/$${b}_bench.py || exit 1; done
	$(PY) bench/report.py

# DreamBench on a Prefect process work pool: a server if none runs, WORKERS workers, all stopped at the end.
DATASET ?= ../shared/dreambench
WORKERS ?= 2
benchmark: $(VENV)/.runtime-$(DEPS_HASH)
	$(PY) -m flows.benchmark $(DATASET) --workers $(WORKERS)

# Re-create the world-pretrained models (models/world) from seed 0, two groups at a time on a 2-core CPU: 81 min
# here (supervisor 71 min beside LlamaGen 55 min, then VAR 27 min and the evaluators 9 min), weights in fp16.
world: $(VENV)/.runtime-$(DEPS_HASH)
	$(PY) -m testbed.world_pretrain --out models/world

prefect-server: $(VENV)/.runtime-$(DEPS_HASH)
	$(BIN)/prefect server start

serve: $(VENV)/.runtime-$(DEPS_HASH)
	PREFECT_API_URL=$(PREFECT_URL) $(PY) -m flows.serve

mlflow-ui: $(VENV)/.runtime-$(DEPS_HASH)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db
