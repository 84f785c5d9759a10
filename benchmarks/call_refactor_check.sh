#!/usr/bin/env bash
# One H200 call after the architecture refactor: the GPU tests, falcon-bench 0.5B 4 x 4096 (graphed,
# eager, BitNet) to compare with results/2026-11-26_h200_0.5b_b4_session3_graphed.txt, and the
# packed-rows attention candidates. causal_conv1d's wheel (for the Hugging Face fast path) builds in
# the background and comes back in two parts under $OUT (a returned file is at most 16 MB).
#   device run: bash benchmarks/call_refactor_check.sh     (carry: wheels)
set -uo pipefail
source benchmarks/device_setup.sh
( MAX_JOBS=8 setsid bash benchmarks/build_causal_conv1d.sh wheels/causal_conv1d-1.7.0.tar.gz /tmp/cc1d \
    > /tmp/cc1d_build.log 2>&1 & )
left() { echo $((560 - SECONDS)); }
timeout 200 python3 -m pytest -q -p no:cacheprovider -p no:warnings --tb=short \
  tests/falcon_h1/test_gpu_paths.py tests/falcon_h1/test_cross_entropy_gpu.py tests/recipes/test_cuda_graph_gpu.py \
  tests/recipes/test_optim_gpu.py tests/bitnet/test_triton_gpu.py ${EXTRA_TESTS:-} 2>&1 | grep -v -i warn | tee "$OUT/gpu_tests.txt" | tail -25
G=_cuda_graph
timeout 200 python3 -m benchmarks.falcon_bench --size 0.5b --seq 4096 --batch 4 --steps 5 --warmup 3 --kernels none \
  --variants "ours_fused$G,ours_fused,ours_bitnet_fused$G" --json "$OUT/bench_b4.json" 2>&1 \
  | grep -v -i warn | tee "$OUT/bench_b4.txt" | tail -12
[ "$(left)" -gt 60 ] && timeout $(( $(left) - 40 )) python3 benchmarks/packed_attention_bench.py --json "$OUT/packed_attention.json" 2>&1 \
  | grep -v -i warn | tee "$OUT/packed_attention.txt" | tail -30
while [ "$(left)" -gt 5 ] && ! ls /tmp/cc1d/*.whl >/dev/null 2>&1; do sleep 5; done
tail -3 /tmp/cc1d_build.log > "$OUT/cc1d_build_tail.txt"
if ls /tmp/cc1d/*.whl >/dev/null 2>&1; then
  w=$(ls /tmp/cc1d/*.whl | head -1); basename "$w" > "$OUT/cc1d_name.txt"; split -b 15M "$w" "$OUT/cc1d_part_"
fi
exit 0
