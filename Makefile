# Flotilla: `make demo` runs the example job; `make test` runs the tests.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test test-fast lint install bench clean

$(BIN)/flotilla: pyproject.toml
	$(PY) -m venv $(VENV)
	# torch 2.13.0 (CPU) is pinned in pyproject.toml; pip takes it from local disk where it lies there.
	$(BIN)/pip install -q -e '.[test]'
	touch $(BIN)/flotilla

install: $(BIN)/flotilla
	# bytecode for the editable source, also where PYTHONDONTWRITEBYTECODE is set: every process of a fleet
	# would compile the modules it imports again (pip does this for installed packages)
	$(BIN)/python -m compileall -q src >/dev/null

demo: install
	$(BIN)/flotilla run examples/mnist.yaml

test: install
	$(BIN)/pytest -q -rs

test-fast: install
	$(BIN)/pytest -q -m "not e2e and not docker"

lint: install
	$(BIN)/ruff check src tests bench

bench: install
	$(BIN)/python bench/round_overhead.py

clean:
	rm -rf runs rendered .pytest_cache
