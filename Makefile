# One-command setup: `make test` and `make demo` create .venv and install everything first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export DS_BUILD_OPS := 0
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt

.PHONY: setup test test-fast fuzz demo clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

# CI sets CI=true: tests/conftest.py then loads the derandomized Hypothesis profile (same examples every run)
test: setup
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

# The inner loop (a few minutes on 2 cores): every test but those marked slow, the end-to-end ones that start
# real jobs (local processes, Ray clusters) or train with real worker processes. `make test` runs them all.
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

# Property and fuzz tests with fresh randomness and 20x the examples; run it once a session
fuzz: setup
	HYPOTHESIS_PROFILE=fuzz $(BIN)/python -m pytest -q -m hypothesis

demo: setup
	$(BIN)/oobleck demo

clean:
	rm -rf $(VENV)
