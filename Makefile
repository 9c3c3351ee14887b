# Two commands on a fresh machine: `make run` and `make test`. Each creates .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

LOCK := requirements.lock

.PHONY: run test chaos fuzz soak lint bench clean lock

# the exact versions of requirements.lock (what the tests and benches ran with)
$(BIN)/flowgate: pyproject.toml $(LOCK)
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "Flowgate needs Python >= 3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --constraint $(LOCK) -e '.[dev]'
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

# refresh requirements.lock deliberately: the newest versions pyproject.toml allows, in a
# scratch venv; then run `make test` and the benches before committing it
lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet --upgrade pip
	.lock-venv/bin/pip install --quiet '.[dev]'
	{ sed -n '/^#/p' $(LOCK); .lock-venv/bin/pip freeze --exclude-editable | grep -iv '^flowgate\b'; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	rm -rf .lock-venv
