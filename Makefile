# One entry point for setup, the main job, tests and benchmarks.
# The pinned CPU torch goes in FIRST: an unpinned torch resolves to a multi-GB CUDA build.
# On a GPU machine, install your CUDA torch into .venv first; `make install` keeps it.
PY      ?= python3
VENV    ?= .venv
TORCH   ?= torch==2.13.0
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.scaletrain-installed

.PHONY: install pretrain test lint bench-engines clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# Main job: pretrain the tiny preset end to end on 2 CPU processes (FSDP2, gloo).
pretrain: install
	OMP_NUM_THREADS=1 $(BIN)/torchrun --standalone --nproc_per_node 2 launch/pretrain.py \
		--engine fsdp --model-size tiny --data synthetic --max-steps 60 --log-interval 10 \
		--batch-size 8 --max-seq-length 128 --learning-rate 3e-3 --warmup-steps 6

test: install
	$(BIN)/python -m pytest -q tests

lint: install
	$(BIN)/ruff check scaletrain launch benchmarks tests

bench-engines: install
	$(BIN)/python benchmarks/engine_overhead.py

clean:
	rm -rf runs checkpoints wandb .pytest_cache
