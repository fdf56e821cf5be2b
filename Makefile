# Every target creates the virtualenv when it is missing, so each works on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# What serving needs (make run), and that plus the test and bench tools (everything else).
# The full install covers the serving one, so it touches both stamps: make run after make
# test installs nothing more, make test after make run adds the extras.
SERVE_STAMP := $(VENV)/.installed-serve
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: install run test bench lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(SERVE_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $(SERVE_STAMP)

$(DEV_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test,bench]'
	touch $(DEV_STAMP) $(SERVE_STAMP)

install: $(DEV_STAMP)

run: $(SERVE_STAMP)
	$(BIN)/registry-trio serve $(if $(CONFIG),-c $(CONFIG))

test: $(DEV_STAMP)
	$(BIN)/ruff check registry_trio tests bench
	$(BIN)/mypy
	$(BIN)/pytest $(PYTEST_ARGS)

bench: $(DEV_STAMP)
	$(BIN)/python bench/push.py
	$(BIN)/python bench/bigblob.py
	$(BIN)/python bench/nats_sink.py
	$(BIN)/python bench/events.py
	$(BIN)/python bench/backlog.py
	$(BIN)/python bench/auth.py
	$(BIN)/python bench/crash_soak.py
	$(BIN)/python bench/compare.py

lint: $(DEV_STAMP)
	$(BIN)/ruff check registry_trio tests bench
	$(BIN)/ruff format --check registry_trio tests bench
	$(BIN)/mypy

clean:
	rm -rf $(VENV) registry_data queue_data .pytest_cache .mypy_cache
