# One device call for the project's own SSD kernels against mamba_ssm's (benchmarks/ssd_bench.py):
#   device run: bash benchmarks/call_ssd.sh     (carry: wheels, .triton_cache_tgz; timeout_s 600)
# Each step has its own time limit, so a slow step cannot take the others' results with it:
#   1. the whole 0.5B training step (falcon-bench, 4 x 4096), CUDA-graphed (the eager step is bound by
#      host launches), with model.ssd_kernels = mamba_ssm and own, in one process
#   2. the bench at the 0.5B, 7B and packed 0.5B shapes (GPU ms and per-kernel ms first, then the
#      errors against float64)
#   3. the GPU test of the own kernels (tests/falcon_h1/test_ssd_own_gpu.py)
#   4. Triton's cache back under $OUT/triton_cache_tgz (copy it to .triton_cache_tgz/ for the next call)
# Writes $OUT/step.txt + step.json, ssd.txt + ssd.json, ssd_gpu_tests.txt.
source benchmarks/device_setup.sh
run "${STEP_S:-200}" step.txt python3 -m benchmarks.falcon_bench --size 0.5b --variants ours_fused_cuda_graph,ours_fused_own_ssd_cuda_graph \
  --kernels none --json "$OUT/step.json"
run "${SSD_BENCH_S:-200}" ssd.txt python3 -m benchmarks.ssd_bench --shapes 0.5b 7b 0.5b_packed --json "$OUT/ssd.json"
run "${SSD_TESTS_S:-150}" ssd_gpu_tests.txt python3 -m pytest -v tests/falcon_h1/test_ssd_own_gpu.py -p no:warnings --tb=short
save_triton_cache
tail -12 "$OUT/step.txt"; grep "^TIMING" "$OUT/ssd.txt"; grep -A8 "^shape" "$OUT/ssd.txt"
grep -E "PASS|FAIL|passed|failed|exit" "$OUT/ssd_gpu_tests.txt"
