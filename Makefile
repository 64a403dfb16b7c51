# Two commands: `make run` and `make test`. Both set up everything they need.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA ?= kilde-data
PLAN ?= src/kilde/demo/kilde.yaml

.PHONY: run test lint typecheck unit setup system-packages bench screenshots clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

# Debian packages the tests need (Chromium for the browser tests). Skipped when present.
system-packages:
	@if [ ! -x /usr/bin/chromium ]; then \
		if [ "$$(id -u)" = "0" ]; then SUDO=""; else SUDO="sudo"; fi; \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium >/dev/null; \
	fi
	@if ! command -v java >/dev/null 2>&1; then \
		if [ "$$(id -u)" = "0" ]; then SUDO=""; else SUDO="sudo"; fi; \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq default-jre-headless >/dev/null; \
	fi

run: setup
	KILDE_PLAN=$(PLAN) KILDE_DATA=$(DATA) $(BIN)/kilde demo
	KILDE_PLAN=$(PLAN) KILDE_DATA=$(DATA) $(BIN)/kilde users add admin --role admin --generate --if-none
	KILDE_PLAN=$(PLAN) KILDE_DATA=$(DATA) $(BIN)/kilde serve

lint: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: setup
	$(BIN)/mypy

unit: setup system-packages
	$(BIN)/pytest

test: lint typecheck unit

screenshots: setup system-packages
	KILDE_DOC_SCREENSHOTS=1 $(BIN)/pytest -q tests/test_dashboard.py

bench: setup
	$(BIN)/python bench/ingest.py

clean:
	rm -rf $(VENV) $(DATA) .pytest_cache .mypy_cache .ruff_cache
