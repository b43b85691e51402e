# The README's quick start: `make demo` (set up + run the pipeline on the demo set) and
# `make test` (set up + run the tests in both environments).
TRAIN := .venvs/train/bin
GEN := .venvs/gen/bin
PYTEST_ARGS ?=
LINT_PATHS := $(wildcard ltdist tests benchmarks launchers)

.PHONY: setup demo table test test-train test-gen lint format bench clean-demo

setup:
	bash scripts/setup_envs.sh

demo: setup
	bash scripts/demo.sh

test: setup
	$(MAKE) test-train test-gen

test-train:
	$(TRAIN)/python -m pytest -m "not gen_env" $(PYTEST_ARGS)

test-gen:
	$(GEN)/python -m pytest -m "gen_env or both_envs" $(PYTEST_ARGS)

lint:
	$(TRAIN)/ruff check $(LINT_PATHS)
	$(TRAIN)/ruff format --check $(LINT_PATHS)

format:
	$(TRAIN)/ruff check --fix $(LINT_PATHS)
	$(TRAIN)/ruff format $(LINT_PATHS)

table: setup
	$(TRAIN)/python benchmarks/demo_table.py

bench: setup
	$(TRAIN)/python benchmarks/loader.py

clean-demo:
	rm -rf data/demo data/demo_tiny shards/demo shards/demo_stag shards/demo_stag_tiny runs/demo runs/demo_tiny
