#!/usr/bin/env bash
# One single-GPU call for the BitNet step (issue 17, benchmarks/NOTES.md "BitNet quantise-once"):
# the BitNet GPU tests (Triton kernels bit for bit, the weight cache under fused AdamW and CUDA
# graphs), then benchmarks/bitnet_step_bench.py at the 0.5B shape, 4 x 4096: per-projection costs
# first (short), then bf16 vs BitNet training steps side by side.
#   device run: bash benchmarks/bitnet_suite.sh     (carry: wheels)
# Env: TESTS=0 skips the tests; TABLES (layers,steps); BENCH_ARGS (extra bitnet_step_bench flags).
set -uo pipefail
source benchmarks/device_setup.sh
if [ "${TESTS:-1}" = 1 ]; then
  timeout 150 python3 -m pytest -q -p no:cacheprovider -p no:warnings --tb=short tests/bitnet/test_triton_gpu.py \
    2>&1 | tail -25 | tee "$OUT/bitnet_gpu_tests.txt"
fi
timeout $((570 - SECONDS)) python3 -m benchmarks.bitnet_step_bench --size 0.5b --seq 4096 --batch 4 \
  --tables "${TABLES:-layers,steps}" ${BENCH_ARGS:-} --json "$OUT/bitnet_step_bench.json" 2>&1 \
  | grep -v -i warn | tee "$OUT/bitnet_step_bench.txt"
