#!/usr/bin/env bash
# Single-GPU call 1 of 2: GPU tests, then the step benchmark (falcon-bench) at batch 4 x 4096 for the
# Falcon-H1-0.5B shape (ours eager and CUDA-graphed, ablations, Hugging Face transformers on its
# mamba_ssm + causal_conv1d fast path), the kernel microbenchmarks, and a profile of our eager step.
# Batch 1 and the training runs are call 2, benchmarks/train_suite.sh (one call is at most 10 min).
#   device run: bash benchmarks/final_suite.sh     (carry: wheels, .whl)
#   .whl holds causal_conv1d's wheel built by benchmarks/build_causal_conv1d.sh on that machine.
set -uo pipefail
source benchmarks/device_setup.sh
bench() { python3 -m falcon_h1.bench --size 0.5b --seq 4096 "$@" 2>&1 | grep -v -i warn; }
if [ "${TESTS:-1}" = 1 ]; then
  timeout 300 python3 -m pytest -q -p no:cacheprovider -p no:warnings --tb=short \
    tests/falcon_h1/test_gpu_paths.py 2>&1 | tail -12 | tee "$OUT/gpu_tests.txt"
fi
bench --batch 4 --steps 5 --warmup 3 --kernels all \
  --variants ours_fused_prev,ours_fused,ours_fused_cuda_graph,hf_transformers,ours_fused_no_branch_fn,ours_fused_no_fused_norm,ours_fused \
  --profile ours_fused --json "$OUT/bench_b4.json" | tail -60 | tee "$OUT/bench_b4.txt"
