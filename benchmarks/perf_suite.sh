#!/usr/bin/env bash
# One device call for the Falcon-H1 GPU-performance work (benchmarks/NOTES.md): every variant
# of the training step side by side, a kernel profile and kernel microbenchmarks, then GPU tests.
#   device run: bash benchmarks/perf_suite.sh        (carry: wheels)
# Env: VARIANTS, PROFILE (variants to profile), STEPS, TESTS (pytest args, "none" to skip),
#      TEST_TIMEOUT (s), BENCH_ARGS (extra falcon-bench flags, e.g. --no-kernels).
set -uo pipefail
source benchmarks/device_setup.sh
python3 -m benchmarks.falcon_bench --size 0.5b --seq 4096 --batch 4 --steps ${STEPS:-5} --warmup 3 \
  --variants ${VARIANTS:-ours_fused_options_off,ours_fused,ours_fused_conv_only,ours_fused_no_swiglu,ours_fused_options_off,ours_fused} \
  --profile "${PROFILE-}" ${BENCH_ARGS:-} --json "$OUT/bench.json" 2>&1 \
  | grep -v -i warn | tee "$OUT/bench.txt"
if [ "${TESTS:-}" != none ]; then
  timeout ${TEST_TIMEOUT:-150} python3 -m pytest -q -p no:cacheprovider -p no:warnings --tb=short \
    ${TESTS:-tests/falcon_h1/test_gpu_paths.py} 2>&1 | tail -30 | tee "$OUT/gpu_tests.txt"
fi
