# Two commands on a fresh machine: `make run` and `make test`. Each creates .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test chaos fuzz soak lint bench clean

$(BIN)/flowgate: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "Flowgate needs Python >= 3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $@

run: $(BIN)/flowgate
	$(BIN)/flowgate up

test: $(BIN)/flowgate
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

# parts of `make test`, alone: the chaos drills (tests/chaos) and the fuzzers (tests/fuzz)
chaos: $(BIN)/flowgate
	$(BIN)/python -m pytest tests/chaos

fuzz: $(BIN)/flowgate
	$(BIN)/python -m pytest tests/fuzz

# not a test: 30 minutes of load with a fault every minute (SOAK_MINUTES=2 for a try)
SOAK_MINUTES ?= 30
soak: $(BIN)/flowgate
	$(BIN)/python bench/soak.py --minutes $(SOAK_MINUTES)

bench: $(BIN)/flowgate
	$(BIN)/python bench/engine_core.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
