# Two commands a user needs: `make demo` and `make test`. Both set up .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)
# Prefect's database and cached results live in the project, so the UI shows the demo's runs.
export PREFECT_HOME ?= $(CURDIR)/.prefect
PREFECT_URL ?= http://127.0.0.1:4200/api

.PHONY: demo test bench world install prefect-server serve mlflow-ui

$(PY):
	python3 -m venv $(VENV)

# Re-install only when the project's dependencies change.
$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e . && touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[dev]' && touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/dvc repro
	$(PY) -m proxytune.summary

test: $(VENV)/.installed-dev
	$(PY) -m pytest -q

# Every bench/*_bench.py runs; each writes its figures to bench/results/<name>.json and prints them.
bench: $(VENV)/.installed-dev
	for b in bench/*_bench.py; do $(PY) $$b || exit 1; done

# Re-create the shipped world-pretrained models (models/world) from seed 0: about 45 min on a 2-core CPU.
world: $(VENV)/.installed
	$(PY) -m proxytune.world_pretrain --out models/world

prefect-server: $(VENV)/.installed
	$(BIN)/prefect server start

serve: $(VENV)/.installed
	PREFECT_API_URL=$(PREFECT_URL) $(PY) -m flows.serve

mlflow-ui: $(VENV)/.installed
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db
