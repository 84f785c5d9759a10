# One device call for the project's own SSD kernels against mamba_ssm's (benchmarks/ssd_bench.py):
#   device run: bash benchmarks/call_ssd.sh     (carry: wheels, .triton_cache_tgz; timeout_s 590)
# Each step has its own time limit, so a slow step cannot take the others' results with it:
#   1. the whole 0.5B training step (falcon-bench, 4 x 4096), CUDA-graphed (the eager step is bound by
#      host launches), with model.ssd_kernels = mamba_ssm and own, interleaved twice in one process
#   2. the forward's tile sweep (FORWARD_SWEEP, each setting a process against mamba_ssm's forward in
#      the same process) at the 0.5B and 7B shapes
#   3. the GPU test of the own kernels (tests/falcon_h1/test_ssd_own_gpu.py)
#   4. Triton's cache back under $OUT/triton_cache_tgz (copy it to .triton_cache_tgz/ for the next call)
# Writes $OUT/step.txt + step.json, ssd_fwd_sweep.txt, ssd_gpu_tests.txt.
source benchmarks/device_setup.sh
G=_cuda_graph
run "${STEP_S:-200}" step.txt python3 -m benchmarks.falcon_bench --size 0.5b --steps 8 --warmup 2 --kernels none \
  --variants "ours_fused$G,ours_fused_own_ssd$G,ours_fused$G,ours_fused_own_ssd$G" --json "$OUT/step.json"
grep -A5 "^variant" "$OUT/step.txt" | cut -c1-110
run "${SSD_SWEEP_S:-200}" ssd_fwd_sweep.txt python3 -m benchmarks.ssd_bench --shapes 0.5b 7b --forward-sweep
grep "^sweep" "$OUT/ssd_fwd_sweep.txt"; tail -2 "$OUT/ssd_fwd_sweep.txt"
run "${SSD_TESTS_S:-150}" ssd_gpu_tests.txt python3 -m pytest -v tests/falcon_h1/test_ssd_own_gpu.py -p no:warnings --tb=short
grep -E "PASS|FAIL|passed|failed|exit" "$OUT/ssd_gpu_tests.txt"
save_triton_cache
exit 0
