#!/usr/bin/env bash
# Single-GPU call for the numbers a user of falcon-train gets:
#  1. the fused-optimizer GPU test (tests/recipes/test_optim_gpu.py);
#  2. falcon-train through benchmarks/scaling.py's launch path, CUDA-graphed, with
#     train.fused_optimizer=true (torch's fused AdamW, foreach grad norm) and =false (Megatron's
#     fallbacks) side by side: the 0.5B at 4 x 4096, then 3B (the MFU goal; micro batch 2 on an
#     H200, 1 on an H100);
#  3. between them, the kernel microbenchmarks (eager and GPU time, SSD per-kernel profile);
#  4. with B1=1, first the batch-1 falcon-bench comparison (ours graphed/eager, Hugging Face on its
#     fast path, the unfused two-branch model with unfused attention, which does not fit at batch 4).
# Each step runs only while enough of the call's 570 s is left. Text goes to $OUT/suite.log (at most
# 8 files come back: device.txt, suite.log and the JSON files).
#   device run: bash benchmarks/train_suite.sh     (carry: wheels, .whl)
set -uo pipefail
source benchmarks/device_setup.sh
MEM_MIB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
MICRO_3B=$([ "$MEM_MIB" -ge 122880 ] && echo 2 || echo 1)
left() { echo $((570 - SECONDS)); }
if [ "${B1:-0}" = 1 ]; then
  python3 -m benchmarks.falcon_bench --size 0.5b --seq 4096 --batch 1 --steps 5 --warmup 2 --kernels none \
    --variants ours_fused_cuda_graph,ours_unfused_unfused_attention,hf_transformers,ours_fused \
    --json "$OUT/bench_b1.json" 2>&1 | grep -v -i warn | tail -9 | tee -a "$OUT/suite.log"
fi
timeout 120 python3 -m pytest -q -p no:cacheprovider -p no:warnings --tb=short tests/recipes/test_optim_gpu.py \
  2>&1 | grep -v -i warn | tail -15 | tee -a "$OUT/suite.log"
train() { name=$1; shift
  [ "$(left)" -gt 90 ] || { echo "skipped $name: $(left) s left" | tee -a "$OUT/suite.log"; return; }
  timeout $(( $(left) < 200 ? $(left) : 200 )) python3 benchmarks/scaling.py run --work /tmp/train_$name \
    --cases dp1 --steps 8 --warmup 3 --cuda-graph "$@" 2>&1 | grep -v -i -E "warn|^\s*$" | tail -1 \
    | tee -a "$OUT/suite.log"
  cp /tmp/train_$name/scaling.json "$OUT/train_$name.json" 2>/dev/null; }
train 05b_fused_optimizer
train 05b_megatron_optimizer --override train.fused_optimizer=false
timeout 150 python3 -m benchmarks.falcon_bench --variants "" --kernels no_sweep --json "$OUT/kernels.json" 2>&1 \
  | grep -v -i warn | grep -E "^  (kernel|ssd profile)" | tee -a "$OUT/suite.log"
train 3b_fused_optimizer --dp-model falcon_h1_3b --dp-micro-batch "$MICRO_3B"
train 3b_megatron_optimizer --dp-model falcon_h1_3b --dp-micro-batch "$MICRO_3B" --override train.fused_optimizer=false
