# pixelmill: `make demo` and `make test` set everything up from a fresh clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# This machine's local PyTorch wheels (CPU use; pip takes them from disk).
TORCH  ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: install demo test lint browser postgres bench reliability clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/pixelmill demo

# Debian's Chromium renders report.html in the browser test.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	  || echo "warning: could not install chromium; the report browser test will be skipped"; }

# Debian's PostgreSQL server for the scale-out tests (tune workers on one study, a real mlflow server);
# Debian keeps initdb and postgres in /usr/lib/postgresql/<major>/bin, off PATH.
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || { \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) \
	  || echo "warning: could not install postgresql; the PostgreSQL and MLflow-server tests will be skipped"; }

# Lint and the layer contracts (pyproject.toml) first: seconds, and they fail before a 10-minute suite.
lint: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports

test: install browser postgres lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Every claim in benchmarks/ measured on this machine (~20 min); rewrites benchmarks/RESULTS.md.
bench: install
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python benchmarks/run_all.py

# Only the fault and bad-input cases; the table (case, tried, passed) prints at the end. The server soak runs 60 s here.
reliability: install browser
	PIXELMILL_SOAK_SECONDS=60 $(BIN)/python -m pytest -m reliability -p no:cacheprovider

clean:
	rm -rf $(VENV) runs demo-data mlruns.db mlartifacts .pytest_cache
