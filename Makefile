# Two entry points, both self-contained on a fresh machine:
#   make test   venv + install + brokers + ruff + mypy + pytest
#   make demo   the operator's main job on the bundled example pool
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo lint crd brokers clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

brokers:
	bash scripts/brokers.sh start

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

test: $(STAMP) brokers lint
	$(BIN)/pytest

crd: $(STAMP)
	$(BIN)/celery-worker-operator crd > deploy/crds/celeryworkerpools.celery-operator.dev.yaml

demo: $(STAMP)
	@bash scripts/brokers.sh start redis >/dev/null 2>&1 || { bash scripts/brokers.sh install redis && bash scripts/brokers.sh start redis; }
	$(BIN)/celery-worker-operator demo

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
