#!/usr/bin/env bash
# Single-GPU call for the numbers a user of falcon-train gets, plus the batch-1 comparison:
#  1. falcon-bench at batch 1 x 4096 (0.5B): ours (CUDA graph, eager), Hugging Face on its fast
#     path, and the unfused two-branch model with unfused attention (which does not fit at batch 4);
#  2. falcon-train through benchmarks/scaling.py's launch path: 3B (MFU goal) and 0.5B eager, and a
#     4-layer 0.5B with train.cuda_graph=true (the capture check);
#  3. the CUDA-graph training and BitNet Triton GPU tests, with the time that is left.
#   device run: bash benchmarks/train_suite.sh     (carry: wheels, .whl)
set -uo pipefail
source benchmarks/device_setup.sh
MEM_MIB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
MICRO_3B=$([ "$MEM_MIB" -ge 122880 ] && echo 2 || echo 1)
python3 -m falcon_h1.bench --size 0.5b --seq 4096 --batch 1 --steps 5 --warmup 2 --kernels none \
  --variants ours_fused_cuda_graph,ours_unfused_unfused_attention,hf_transformers,ours_fused \
  --json "$OUT/bench_b1.json" 2>&1 | grep -v -i warn | tail -9 | tee "$OUT/bench_b1.txt"
train() { name=$1; shift
  timeout 200 python3 benchmarks/scaling.py run --work /tmp/train_$name --cases dp1 --steps 8 --warmup 3 "$@" \
    2>&1 | grep -v -i -E "warn|^\s*$" | tail -6 | tee "$OUT/train_$name.txt"
  cp /tmp/train_$name/scaling.json "$OUT/train_$name.json" 2>/dev/null; }
train 3b_eager --dp-model falcon_h1_3b --dp-micro-batch "$MICRO_3B"
train 05b_eager
train 05b_graph --cuda-graph --override model.num_hidden_layers=4
left=$((570 - SECONDS))
[ "$left" -gt 60 ] && timeout "$left" python3 -m pytest -q -p no:cacheprovider -p no:warnings --tb=short \
  tests/recipes/test_cuda_graph_gpu.py tests/bitnet/test_triton_gpu.py 2>&1 | tail -8 | tee "$OUT/late_gpu_tests.txt"
