# Two entry points for a fresh machine: `make up` and `make test`. Each creates .venv when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: up test test-examples lint

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
	$(BIN)/pytest -q -n 2
	$(MAKE) --no-print-directory test-examples

# Every example's own test cases (examples/*/bridge.test.yaml): a template change that breaks one fails CI.
test-examples: $(BIN)/.installed
	@status=0; for config in examples/*/bridge.yaml; do \
		echo "bridge test -c $$config"; $(BIN)/bridge test -c "$$config" || status=1; \
	done; exit $$status

lint: $(BIN)/.installed
	$(BIN)/ruff check bridge tests bench
	$(BIN)/mypy
