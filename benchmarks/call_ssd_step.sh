# The whole 0.5B training step (falcon-bench, 4 x 4096, CUDA-graphed) with mamba_ssm's SSD kernels
# and the project's own (model.ssd_kernels), interleaved in one process (mamba, own, mamba, own) so an
# order effect shows as a difference between the repeats, then the GPU test's tiny case:
#   device run: bash benchmarks/call_ssd_step.sh     (carry: wheels, .triton_cache_tgz; timeout_s 600)
# Nothing else may use the GPU while the step is timed (a test compiling and running beside it took
# the graphed step from 198.7 to 259.5 ms), and only graphed steps are compared: the eager step is
# bound by host launches on these machines (300-350 ms for 195 ms of kernels), its noise larger than
# the difference.
# Writes $OUT/step.txt + step.json, ssd_gpu_tiny.txt, and Triton's cache under $OUT/triton_cache_tgz
# (copy it to .triton_cache_tgz/ for the next call).
source benchmarks/device_setup.sh
pair=ours_fused_cuda_graph,ours_fused_own_ssd_cuda_graph
run "${STEP_S:-200}" step.txt python3 -m benchmarks.falcon_bench --size 0.5b --steps 10 --kernels none \
  --variants "$pair,$pair" --json "$OUT/step.json"
run "${TINY_S:-200}" ssd_gpu_tiny.txt python3 -m pytest -v tests/falcon_h1/test_ssd_own_gpu.py -k tiny \
  -p no:warnings --tb=short --durations=0
save_triton_cache
grep -A5 "^variant" "$OUT/step.txt"; grep -E "PASS|FAIL|assert|s call|exit" "$OUT/ssd_gpu_tiny.txt"
