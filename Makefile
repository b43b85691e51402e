# The README's quick start: `make demo` (set up + run the pipeline on the demo set) and
# `make test` (set up + run the tests in both environments). `make setup` builds for the GPU
# when nvidia-smi lists one, else for the CPU; DEVICE=cpu|cuda decides instead, PLAN=1 only
# says what it would do.
DEVICE ?=
PLAN ?=
TRAIN := .venvs/train/bin
GEN := .venvs/gen/bin
PYTEST_ARGS ?=
LINT_PATHS := $(wildcard ltdist tests benchmarks launchers scripts)

# `make rehearse`: every shipped config's plan at its own shape and at cluster shapes, and its
# run here at reduced width. The split files are fetched into SPLITS first (SPLITS_SOURCE: a
# local copy instead of the public files).
SPLITS ?= data/splits
SPLITS_SOURCE ?=
SHIPPED := $(foreach d,stag pretrain finetune,$(sort $(wildcard configs/$(d)/*.yaml)))

.PHONY: setup demo table test test-train test-gen lint format bench clean-demo rehearse \
	check-constraints lock-constraints

setup:
	DEVICE=$(DEVICE) bash scripts/setup_envs.sh $(if $(PLAN),--plan)

# Every constraints set resolves against the registry as pinned (dry run: metadata only, nothing
# installed); lock-constraints regenerates the CUDA sets (constraints/cuda/) by a real resolve.
check-constraints:
	$(TRAIN)/python scripts/constraints.py check

lock-constraints:
	$(TRAIN)/python scripts/constraints.py lock

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

rehearse: setup
	for bench in coco_lt voc_lt; do \
	    $(TRAIN)/ltdist data fetch-splits $$bench --dest $(SPLITS) $(if $(SPLITS_SOURCE),--source $(SPLITS_SOURCE)) || exit 1; \
	done
	$(TRAIN)/ltdist rehearse $(SHIPPED) \
	    --shapes 1x8,2x8,8x8 --splits-dir $(SPLITS) --work runs/rehearsal

bench: setup
	$(TRAIN)/python benchmarks/loader_throughput.py
	$(TRAIN)/python benchmarks/pack_throughput.py

clean-demo:
	rm -rf data/demo data/demo_tiny shards/demo shards/demo_stag shards/demo_stag_tiny runs/demo runs/demo_tiny
