# The two commands of the README: `make run` and `make test`. Everything else is a helper.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG ?= config.example.yaml

.PHONY: run test lint typecheck bench system-deps clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

# Debian packages the tests drive as real clients and peers (curl; chromium and its driver for
# the dashboard test; prometheus and promtool for tests/observability), as command:package
# pairs. Only as root, only if missing.
system-deps:
	@missing=""; for pair in curl:curl chromium:chromium chromedriver:chromium-driver \
	  prometheus:prometheus promtool:prometheus; do \
	  command -v $${pair%%:*} >/dev/null || missing="$$missing $${pair#*:}"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq $$missing; \
	  else echo "please install:$$missing" >&2; exit 1; fi; fi

run: $(STAMP)
	$(BIN)/socks5-analytics up --config $(CONFIG)

test: $(STAMP) system-deps
	$(BIN)/ruff check .
	$(BIN)/mypy socks5_analytics proxy_node collector api
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy socks5_analytics proxy_node collector api

bench: $(STAMP)
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
