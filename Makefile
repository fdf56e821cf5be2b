# Every target creates the virtualenv when it is missing, so each works on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test bench lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test,bench]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/registry-trio serve $(if $(CONFIG),-c $(CONFIG))

test: $(STAMP)
	$(BIN)/ruff check registry_trio tests bench
	$(BIN)/mypy
	$(BIN)/pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python bench/push.py
	$(BIN)/python bench/bigblob.py
	$(BIN)/python bench/nats_sink.py
	$(BIN)/python bench/events.py
	$(BIN)/python bench/backlog.py
	$(BIN)/python bench/auth.py
	$(BIN)/python bench/crash_soak.py
	$(BIN)/python bench/compare.py

lint: $(STAMP)
	$(BIN)/ruff check registry_trio tests bench
	$(BIN)/ruff format --check registry_trio tests bench
	$(BIN)/mypy

clean:
	rm -rf $(VENV) registry_data queue_data .pytest_cache .mypy_cache
