#!/usr/bin/env bash
# throughput: large truncated to 4 layers (1,071.7M params, d_model 4096, 32 heads), seq 2048, bf16, accumulation 1, world 1, device NVIDIA H200, peak 989.4 TFLOP/s; 2 warm-up + 3 measured steps per point
# note: --num-layers keeps width and heads; per-layer throughput and MFU carry over to the full depth, memory and the largest micro-batch that fits do not
torchrun --nproc_per_node 1 launch/pretrain.py --engine fsdp --model-size large --batch-size 16 --max-seq-length 2048 --gradient-accumulation-steps 1 --mixed-precision bf16 --compile
