# One entry point for setup, the main job, tests and benchmarks.
# The pinned CPU torch goes in FIRST: an unpinned torch resolves to a multi-GB CUDA build.
# On a GPU machine, install your CUDA torch into .venv first; `make install` keeps it.
PY      ?= python3
VENV    ?= .venv
TORCH   ?= torch==2.13.0
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.scaletrain-installed

.PHONY: install ds-ops pretrain demo test lint bench-engines bench-loader clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# Main job: the embedded sample corpus -> WebDataset shards (arxiv 30% / general 70%) -> pretrain
# the tiny preset on 2 CPU processes (FSDP2, gloo), with validation loss, ending with runs/sample/checkpoints/final
# and the command that converts it for transformers; about 2 minutes. Run again, it continues that run (--resume
# auto: a finished one says so and trains nothing) rather than writing over its checkpoints. fp32: the same losses
# on any CPU (the default is bf16 where the CPU has it natively, AMX or AVX512-BF16, and fp32 elsewhere).
pretrain: install
	$(BIN)/python launch/demo.py --prepare-only
	OMP_NUM_THREADS=1 $(BIN)/torchrun --standalone --nproc_per_node 2 launch/pretrain.py \
		--engine fsdp --model-size tiny --data-dir data/sample/pretraining --data-sources arxiv general \
		--data-mix-weights 0.3 0.7 --max-steps 100 --log-interval 10 --eval-interval 50 --micro-batch-size 8 \
		--max-seq-length 256 --learning-rate 3e-3 --warmup-steps 10 --mixed-precision fp32 --run-name sample \
		--resume auto

# The original design's demo: sample data, shards, the mixing, 20 steps in one process.
demo: install
	$(BIN)/python launch/demo.py

# DeepSpeed JIT-compiles the ops it uses on a CPU on first use: the shared-memory comm op (every ZeRO run) and
# DeepSpeedCPUAdam (optimizer offload), about 1.5 and 2.8 minutes on 2 cores, once per machine (cached under
# ~/.cache/torch_extensions). Built here, as part of setting up, so no test and no first run pays for it; a few
# seconds once cached. On a GPU machine only the ops its accelerator has are built.
ds-ops: install
	$(BIN)/python -c "from deepspeed.accelerator import get_accelerator as a; \
	bs = [a().create_op_builder(n) for n in ('ShareMemCommBuilder', 'CPUAdamBuilder')]; \
	[b.load(verbose=False) for b in bs if b is not None and b.is_compatible()]"

# Two test processes (pytest-xdist, work stealing): most tests launch training jobs whose start-up (torch
# imports, launcher, process group) leaves a core idle, so two at a time took the suite on 2 cores from 26.7 to
# 16.5 min; four were slower than two. TEST_WORKERS=0 runs them in one process.
TEST_WORKERS ?= 2
test: install ds-ops
	$(BIN)/python -m pytest -q --durations=15 -n $(TEST_WORKERS) --dist worksteal tests

lint: install
	$(BIN)/ruff check scaletrain launch benchmarks tests

bench-engines: install
	$(BIN)/python benchmarks/engine_overhead.py

bench-loader: install
	$(BIN)/python benchmarks/loader_throughput.py

clean:
	rm -rf runs checkpoints exports wandb .pytest_cache
