# Sluice: `make run` runs the demo, `make test` runs the tests. Everything else is optional.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# Extra arguments for `make run`, e.g. make run ARGS="proxy -c sluice.toml"
ARGS ?= demo

.PHONY: run test bench lint install clean

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c requirements.lock -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/sluice $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Each prints its figures and PASS/MISS against its target; docs/benchmarks.md records them.
bench: $(STAMP)
	$(BIN)/python tests/benchmarks/bench_proxy.py
	$(BIN)/python tests/benchmarks/bench_masking.py
	$(BIN)/python tests/benchmarks/bench_masking_proxy.py
	$(BIN)/python tests/benchmarks/bench_approvals.py
	$(BIN)/python tests/benchmarks/bench_recording.py
	$(BIN)/python tests/benchmarks/bench_recording_proxy.py
	$(BIN)/python tests/benchmarks/bench_console.py
	$(BIN)/python tests/benchmarks/bench_replay.py
	$(BIN)/python tests/benchmarks/bench_forward.py

lint: $(STAMP)
	$(BIN)/ruff check proxy console tests
	$(BIN)/ruff format --check proxy console tests
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) .sluice build *.egg-info
