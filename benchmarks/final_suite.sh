#!/usr/bin/env bash
# Single-GPU call: the step benchmark (falcon-bench) at batch 4 x 4096 for the Falcon-H1-0.5B shape
# (ours CUDA-graphed and eager, the ablations of the latest kernels, Hugging Face transformers on its
# mamba_ssm + causal_conv1d fast path), the kernel microbenchmarks with the SSD per-kernel profile,
# a profile of our eager step; then the GPU tests with the time left (TESTS=0 skips them).
# Batch 1 and the falcon-train runs are benchmarks/train_suite.sh (one call is at most 10 min).
#   device run: bash benchmarks/final_suite.sh     (carry: wheels, .whl)
#   .whl holds causal_conv1d's wheel built by benchmarks/build_causal_conv1d.sh on that machine.
set -uo pipefail
source benchmarks/device_setup.sh
VARIANTS=${VARIANTS:-ours_fused_cuda_graph,ours_fused,ours_fused_ssd_recompute,ours_fused_no_fused_ce,hf_transformers,ours_fused}
timeout 330 python3 -m falcon_h1.bench --size 0.5b --seq 4096 --batch 4 --steps 5 --warmup 3 --kernels all \
  --variants "$VARIANTS" --profile ours_fused --json "$OUT/bench_b4.json" 2>&1 | grep -v -i warn | tee "$OUT/bench_b4.txt"
left=$((570 - SECONDS))
if [ "${TESTS:-1}" = 1 ] && [ "$left" -gt 60 ]; then
  timeout "$left" python3 -m pytest -q -s -p no:cacheprovider -p no:warnings --tb=short tests/falcon_h1/test_gpu_paths.py \
    tests/falcon_h1/test_cross_entropy_gpu.py tests/recipes/test_cuda_graph_gpu.py 2>&1 | grep -v -i warn \
    | tee "$OUT/gpu_tests.txt"
fi
