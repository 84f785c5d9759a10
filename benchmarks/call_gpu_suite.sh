#!/usr/bin/env bash
# One H200 call: every GPU test, falcon-bench 0.5B 4 x 4096 (ours graphed / eager, BitNet graphed, Hugging
# Face on its mamba_ssm + causal_conv1d fast path), then decode speed next to HF generate.
#   device run: bash benchmarks/call_gpu_suite.sh     (carry: wheels, .whl — causal_conv1d's wheel built
#   by benchmarks/build_causal_conv1d.sh on that machine)
# PARTS (default "tests,bench,generate") picks the parts; each part writes its own files under $OUT.
set -uo pipefail
source benchmarks/device_setup.sh
PARTS=${PARTS:-tests,bench,generate}
left() { echo $((570 - SECONDS)); }
has() { [[ ",$PARTS," == *",$1,"* ]]; }
if has tests; then
  timeout ${TESTS_S:-240} python3 -m pytest -q -p no:cacheprovider -p no:warnings --tb=line -rfE \
    $(ls tests/*/test_*gpu*.py) ${EXTRA_TESTS:-} 2>&1 | grep -v -i warn | tee "$OUT/gpu_tests.txt" | tail -30
fi
if has bench; then
  G=_cuda_graph
  timeout ${BENCH_S:-200} python3 -m benchmarks.falcon_bench --size 0.5b --seq 4096 --batch 4 --steps 5 --warmup 3 \
    --kernels none --variants "${VARIANTS:-ours_fused$G,ours_fused,ours_bitnet_fused$G,hf_transformers}" \
    --json "$OUT/bench_b4.json" 2>&1 | grep -v -i warn | tee "$OUT/bench_b4.txt" | tail -14
fi
if has generate && [ "$(left)" -gt 30 ]; then
  timeout $(( $(left) - 10 )) python3 benchmarks/generate_bench.py --out "$OUT" ${GEN_ARGS:-} 2>&1 \
    | grep -v -i warn | tee "$OUT/generate.log" | tail -25
fi
exit 0
