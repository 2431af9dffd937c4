#!/usr/bin/env bash
# throughput: base (1,345.4M params, d_model 2048, 16 heads), seq 2048, bf16, accumulation 1, world 1, device NVIDIA H200, peak 989.4 TFLOP/s; 2 warm-up + 3 measured steps per point
torchrun --nproc_per_node 1 launch/pretrain.py --engine fsdp --model-size base --batch-size 16 --max-seq-length 2048 --gradient-accumulation-steps 1 --mixed-precision bf16
