"""Pre-train a Llama-style model.

    python launch/pretrain.py --data-dir data/pretraining --model-size tiny --max-steps 20   # one process
    torchrun --nproc_per_node 8 launch/pretrain.py --engine fsdp ...                         # FSDP2
    deepspeed --num_gpus 8 launch/pretrain.py --ds_config ds_configs/zero3_bf16.json ...
"""

from scaletrain.cli import pretrain_main

if __name__ == "__main__":
    pretrain_main()
