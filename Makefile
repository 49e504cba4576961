# Entry points for a fresh machine: `make up` (production: an iii engine at $III_URL), `make demo` (try it with the
# bundled test engine) and `make test`. Each creates .venv when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: up demo test test-examples lint

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

up: $(BIN)/.installed
	$(BIN)/bridge up -c bridge.yaml

# The bundled TEST engine (a stand-in for trying and testing, not an iii engine), the example worker that prints
# every call of the trigger type `inbox`, and `bridge up` on ./bridge.yaml, in this terminal; Ctrl-C stops all three.
DEMO_PORT ?= 49199
demo: $(BIN)/.installed
	@echo "make demo: test engine on port $(DEMO_PORT) + examples/demo/worker.py + bridge up -c bridge.yaml"
	@echo "make demo: drop a JSON file into ./inbox, edit the payload in bridge.yaml, drop another; Ctrl-C stops"
	@$(BIN)/python -m bridge.testing.engine --port $(DEMO_PORT) >/dev/null & engine=$$!; \
	trap 'kill $$engine $$worker 2>/dev/null' INT TERM EXIT; \
	III_URL=ws://127.0.0.1:$(DEMO_PORT) $(BIN)/python examples/demo/worker.py & worker=$$!; \
	III_URL=ws://127.0.0.1:$(DEMO_PORT) $(BIN)/bridge up -c bridge.yaml --quiet; status=$$?; \
	kill $$engine $$worker 2>/dev/null; wait; exit $$status

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
