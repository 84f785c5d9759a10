# The whole training step with the project's own SSD kernels against mamba_ssm's, the two
# interleaved in one process (own, mamba, own, mamba, then both CUDA-graphed) so an order effect
# shows as a difference between the repeats:
#   device run: bash benchmarks/call_ssd_step.sh     (carry: wheels, .triton_cache_tgz; timeout_s 600)
#   1. in the background from the start (it compiles on the CPU while the GPU times): the GPU test
#      of the own kernels, its tiny case alone (the other cases are in call_ssd.sh)
#   2. falcon-bench 0.5B 4 x 4096, then 1.5B-Deep 4 x 4096 (own, mamba, own, mamba)
#   3. Triton's cache back under $OUT/triton_cache_tgz (copy it to .triton_cache_tgz/ for the next call)
# Writes $OUT/step_0.5b.txt + .json, step_1.5b_deep.txt + .json, ssd_gpu_tiny.txt.
source benchmarks/device_setup.sh
( run "${TINY_S:-330}" ssd_gpu_tiny.txt python3 -m pytest -v tests/falcon_h1/test_ssd_own_gpu.py -k tiny \
  -p no:warnings --tb=short --durations=0 ) &
tiny=$!
pair=ours_fused_own_ssd,ours_fused
run "${STEP_S:-210}" step_0.5b.txt python3 -m benchmarks.falcon_bench --size 0.5b --steps 10 --kernels none \
  --variants "$pair,$pair,ours_fused_own_ssd_cuda_graph,ours_fused_cuda_graph" --json "$OUT/step_0.5b.json"
run "${STEP_DEEP_S:-170}" step_1.5b_deep.txt python3 -m benchmarks.falcon_bench --size 1.5b-deep --steps 10 --kernels none \
  --variants "$pair,$pair" --json "$OUT/step_1.5b_deep.json"
wait $tiny
save_triton_cache
grep -A7 "^variant" "$OUT"/step_*.txt; grep -E "PASS|FAIL|assert|s call|exit" "$OUT/ssd_gpu_tiny.txt"
