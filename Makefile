# memdsl — the index of developer commands.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0

.PHONY: setup test demo lint golden fuzz bench gpu clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

setup: $(BIN)/python  ## create .venv, install torch (CPU build) when absent, then memdsl with its test extra
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test]"

test: setup  ## the full test suite (what CI runs)
	$(BIN)/python -m pytest -q -n 2 tests

demo: setup  ## inspect a shipped rule: AST, IR, gradients
	$(BIN)/python examples/01_inspect.py

lint: setup
	$(BIN)/ruff check .

golden: setup  ## regenerate golden files (review the diff before committing)
	MEMDSL_REGEN_GOLDEN=1 $(BIN)/python -m pytest -q tests/test_golden.py

FUZZ_EXAMPLES ?= 10000
fuzz: setup  ## the long fuzz run: FUZZ_EXAMPLES/2 generated + 3*FUZZ_EXAMPLES/2 mutated rules + FUZZ_EXAMPLES texts
	MEMDSL_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) nice $(BIN)/python -m pytest -q -n 2 -p no:cacheprovider \
		--hypothesis-show-statistics tests/test_fuzz.py -k "cleanly"

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
