# falcon-train (the loop users run) at 0.5B, 4 x 4096, CUDA-graphed, with torch's profiler over two
# replayed steps (train.profile_step_start/end): its kernels by device time and the device's busy time
# against the step's wall time, to set beside falcon-bench's graphed step. Before it, the GPU tests of
# the new kernels' paths and of the profiler on a graphed run.
#   device run: bash benchmarks/call_train_profile.sh   (carry: wheels, .triton_cache_tgz; timeout_s 600)
# Writes $OUT/gpu_paths.txt, train.txt, train.json, kernels_rank0.txt, and Triton's cache under
# $OUT/triton_cache_tgz.
source benchmarks/device_setup.sh
run "${TESTS_S:-220}" gpu_paths.txt python3 -m pytest -q tests/falcon_h1/test_gpu_paths.py \
  tests/recipes/test_profiling.py -p no:warnings --tb=short
tail -4 "$OUT/gpu_paths.txt"
run "${TRAIN_S:-240}" train.txt python3 benchmarks/scaling.py run --work /tmp/train_profile --cases dp1 \
  --steps 12 --warmup 4 --cuda-graph --override train.profile_step_start=10 --override train.profile_step_end=11
cp /tmp/train_profile/scaling.json "$OUT/train.json" 2>/dev/null
cp /tmp/train_profile/dp1/profile/kernels_rank0.txt "$OUT/" 2>/dev/null || find /tmp/train_profile -name "kernels_rank0.txt" -exec cp {} "$OUT/" \;
save_triton_cache
tail -3 "$OUT/train.txt"; head -30 "$OUT/kernels_rank0.txt" | cut -c1-180
