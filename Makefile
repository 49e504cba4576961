# Two entry points for a fresh machine: `make up` and `make test`. Each creates .venv when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: up test lint

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

up: $(BIN)/.installed
	$(BIN)/bridge up -c bridge.yaml

test: $(BIN)/.installed
	$(BIN)/ruff check bridge tests bench
	$(BIN)/mypy
	$(BIN)/pytest -q

lint: $(BIN)/.installed
	$(BIN)/ruff check bridge tests bench
	$(BIN)/mypy
