#!/usr/bin/env bash
# One prepared GPU session: short training runs of both engines, engine overhead, and the
# throughput sweeps. Each phase has its own time limit so the script always reaches the end
# and packs what it measured.
#   OUT=/some/dir bash benchmarks/gpu_session.sh [PHASE ...]     (default: every phase)
# Phases: train engine_overhead tp_base tp_large tp_base_compile tp_large_compile e2e docmask memory loss large_full
#         fp16 ckpt   (the last three: issue 16 items 1, 4 and 5; each about 4-5 minutes, so one call each)
# On a machine without deepspeed installed, wheels in .whl/ are installed to /tmp/site first.
set -u
OUT=${OUT:-benchmarks/results/gpu_session}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
export PYTHONUNBUFFERED=1 PYTHONPATH=".:${PYTHONPATH:-}"
if [ -d .whl ] && ! python3 -c "import deepspeed" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=".:/tmp/site:${PYTHONPATH}"
fi
phase() {  # phase NAME SECONDS CMD...
  local name=$1 secs=$2; shift 2
  echo "=== $name ($(date +%T), limit ${secs}s): $*" | tee -a "$LOG"
  local t0=$SECONDS
  timeout "$secs" "$@" >>"$LOG" 2>&1; local rc=$?
  echo "=== $name: rc=$rc in $((SECONDS - t0))s" | tee -a "$LOG"
}
{ nvidia-smi -L; python3 -c "import torch, deepspeed; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__, torch.cuda.get_device_name())"; git log -1 --format='commit %h %s' 2>/dev/null; } >>"$LOG" 2>&1
R="$OUT/res"
mkdir -p "$R"
PHASES=${*:-train engine_overhead tp_base tp_large tp_base_compile tp_large_compile}
for p in $PHASES; do
  case $p in
    train)
      phase fsdp_small_train 60 python3 launch/pretrain.py --data-kind synthetic --engine fsdp --model-size small --max-seq-length 2048 \
        --micro-batch-size 8 --max-steps 30 --warmup-steps 5 --learning-rate 6e-4 --log-interval 5 --checkpoint-dir "$R/ck_fsdp_small" \
        --run-dir "$R/runs" --run-name fsdp_small
      phase zero3_small_train 75 python3 launch/pretrain.py --data-kind synthetic --ds_config ds_configs/zero3_bf16.json --model-size small \
        --max-seq-length 2048 --micro-batch-size 8 --max-steps 30 --warmup-steps 5 --learning-rate 6e-4 --log-interval 5 \
        --checkpoint-dir "$R/ck_zero3_small" --run-dir "$R/runs" --run-name zero3_small ;;
    engine_overhead)
      phase engine_overhead 60 python3 benchmarks/engine_overhead.py --model-size small --batch-size 8 --seq 2048 \
        --accum 2 --steps 5 --rounds 2 --engines plain fsdp zero2 zero3 --output "$R" ;;
    tp_base)
      phase tp_base 140 python3 benchmarks/throughput.py --model-size base --engines fsdp zero2 zero3 \
        --activation-checkpointing off --seq 2048 --min-micro-batch 8 --max-micro-batch 16 --output "$R/tp_base" ;;
    tp_large)
      phase tp_large 150 python3 benchmarks/throughput.py --model-size large --num-layers 4 --engines fsdp zero3 \
        --activation-checkpointing off on --seq 2048 --min-micro-batch 2 --max-micro-batch 16 --output "$R/tp_large" ;;
    tp_base_compile)
      phase tp_base_compile 140 python3 benchmarks/throughput.py --model-size base --engines fsdp --compile \
        --activation-checkpointing off --seq 2048 --min-micro-batch 8 --max-micro-batch 16 --output "$R/tp_base_compile" ;;
    tp_large_compile)
      phase tp_large_compile 120 python3 benchmarks/throughput.py --model-size large --num-layers 4 --engines fsdp \
        --compile --activation-checkpointing off --seq 2048 --min-micro-batch 8 --max-micro-batch 16 \
        --output "$R/tp_large_compile" ;;
    e2e)  # the sample corpus -> shards -> FSDP2 / ZeRO-3 training with checkpoints, resume, conversion
      S="$R/sample"; D="--data-dir $S/pretraining --data-sources arxiv general --data-mix-weights 0.3 0.7"
      T="--model-size small --max-seq-length 1024 --micro-batch-size 8 --max-steps 30 --warmup-steps 3 --learning-rate 6e-4"
      T="$T --log-interval 5 --eval-interval 15 --eval-steps 4 --num-workers 2 --run-dir $R/runs"
      phase e2e_prepare 60 python3 launch/demo.py --data-dir "$S" --prepare-only
      phase e2e_fsdp_first 90 python3 launch/pretrain.py $D $T --engine fsdp --checkpoint-dir "$R/ck_fsdp" \
        --save-interval 5 --async-checkpoint --stop-at-step 15 --run-name fsdp_first
      phase e2e_fsdp_resume 90 python3 launch/pretrain.py $D $T --engine fsdp --checkpoint-dir "$R/ck_fsdp" \
        --save-interval 15 --resume latest --run-name fsdp_resumed
      phase e2e_zero3 90 python3 launch/pretrain.py $D $T --ds_config ds_configs/zero3_bf16.json \
        --checkpoint-dir "$R/ck_zero3" --save-interval 30 --run-name zero3
      for k in fsdp zero3; do
        phase "e2e_convert_$k" 90 python3 launch/convert.py "$R/ck_$k" "$R/hf_$k" --dtype fp32 --max-shard-size 200MB
        phase "e2e_logits_$k" 90 python3 benchmarks/hf_logits_check.py "$R/ck_$k/final" "$R/hf_$k"
      done
      rm -rf "$S" "$R"/ck_* "$R"/hf_* ;;
    docmask)  # --document-masking: FlexAttention vs causal step time (goal <= 1.15x), flex vs exact-mask gradients
      phase docmask 120 python3 benchmarks/document_masking.py --model-size small --seq-len 2048 --batch 8 --rounds 5 \
        --output "$R" ;;
    memory)  # scaletrain estimate vs torch.cuda.max_memory_allocated, every engine, AC off/on (goal: within 10%)
      phase memory 420 python3 benchmarks/memory_estimate.py --models small base large@4 --engines fsdp zero2 zero3 \
        --worlds 1 --checkpointing off on --micro-batch-size 2 --seq 2048 --steps 2 --output "$R" ;;
    loss)  # the chunked loss vs F.cross_entropy on fp32 logits at a 128k vocabulary: peak memory and time
      phase loss 120 python3 benchmarks/loss_memory.py --width 2048 --layers 2 --tokens 16384 --repeats 5 \
        --output "$R" ;;
    large_full)  # the full 32-layer large (6.74B) on one GPU with activation checkpointing: tokens/s, MFU, peak
      # memory; goal >= 45% MFU. throughput.py, not pretrain.py: a run's final checkpoint (~108 GB) would not fit the disk
      phase large_full 420 python3 benchmarks/throughput.py --model-size large --engines fsdp zero3 \
        --activation-checkpointing on --seq 2048 --micro-batches 4 8 --warmup 2 --steps 4 --output "$R/large_full" ;;
    fp16)  # ZeRO-2 fp16 with dynamic loss scaling against bf16, 300 steps of small on the same rows: final loss within
      # 2%; metrics.jsonl counts the overflow-skipped steps (skipped_steps)
      for prec in fp16 bf16; do
        phase "zero2_${prec}_small" 150 python3 launch/pretrain.py --data-kind synthetic --ds_config \
          "ds_configs/zero2_${prec}.json" --model-size small --max-seq-length 2048 --micro-batch-size 8 --max-steps 300 \
          --warmup-steps 30 --learning-rate 6e-4 --log-interval 25 --eval-interval 0 --save-interval 0 \
          --checkpoint-dir "$R/ck_$prec" --run-dir "$R/runs" --run-name "zero2_${prec}_small"
      done
      rm -rf "$R"/ck_fp16 "$R"/ck_bf16 ;;
    ckpt)  # base: each engine's save and load against torch.save of the same tensors (goal <= 1.2x), the async stall
      # (goal <= 0.1x the synchronous save); ~21 GB a checkpoint, on the device's disk
      phase ckpt_base 330 python3 benchmarks/checkpoint_bench.py --model-size base --engines fsdp zero3 \
        --no-conversion --workdir "$R/ckbench" --output "$R"
      rm -rf "$R/ckbench" ;;
    *) echo "unknown phase $p" | tee -a "$LOG" ;;
  esac
done
tar -C "$OUT" -czf "$OUT/results.tgz" res 2>>"$LOG"
rm -rf "$R"
echo "done $(date +%T)" >>"$LOG"
