"""Pre-train a Llama-style model.

    python launch/pretrain.py --model-size tiny --max-steps 20            # one process
    torchrun --nproc_per_node 8 launch/pretrain.py --engine fsdp ...       # FSDP2
    deepspeed --num_gpus 8 launch/pretrain.py --ds_config ds_configs/zero3_bf16.json ...
"""

import os
import sys

from scaletrain.checkpoint import CheckpointError
from scaletrain.cli import parse_config
from scaletrain.config import ConfigError
from scaletrain.data.shards import ShardError
from scaletrain.trainer import train


def main() -> None:
    try:
        train(parse_config())
    except (ConfigError, CheckpointError, ShardError) as e:  # user-facing: a message, not a traceback
        sys.stderr.write(f"error: {e}\n")
        sys.stderr.flush()
        os._exit(1)
    # Everything is written and the process group destroyed. Skip interpreter teardown:
    # gloo worker threads can still hold tensors then, and freeing them during finalisation
    # aborts the process now and then ("terminate called without an active exception",
    # seen here about 1 run in 8 under load; pytorch/pytorch#179291 describes it).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
