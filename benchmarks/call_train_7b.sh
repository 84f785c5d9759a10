# falcon-train (the loop users run) on one H200: the 7B at 1 x 4096 (eager, every layer recomputed: its
# fp32 gradients and AdamW state take 113 GiB of the card, recipes/memory_budget.py), then the 0.5B at
# 4 x 4096, CUDA-graphed, with torch's profiler over two replayed steps (train.profile_step_start/end):
# its kernels by device time and the device's busy time against the step's wall time.
#   device run: bash benchmarks/call_train_7b.sh   (carry: wheels[, .triton_cache_tgz]; needs_h200; timeout_s 590)
# Writes $OUT/train_7b.txt + train_7b.json, train_05b.txt + train_05b.json, kernels_rank0.txt, and Triton's
# cache under $OUT/triton_cache_tgz.
source benchmarks/device_setup.sh
run "${SEVEN_S:-300}" train_7b.txt python3 benchmarks/scaling.py run --work /tmp/train_7b --cases dp1 \
  --steps 6 --warmup 2 --dp-model falcon_h1_7b --dp-micro-batch 1 --override train.recompute=full --run-timeout-s 290
cp /tmp/train_7b/scaling.json "$OUT/train_7b.json" 2>/dev/null
tail -4 "$OUT/train_7b.txt"
run "${HALF_S:-220}" train_05b.txt python3 benchmarks/scaling.py run --work /tmp/train_profile --cases dp1 \
  --steps 12 --warmup 4 --cuda-graph --override train.profile_step_start=10 --override train.profile_step_end=11 \
  --run-timeout-s 210
cp /tmp/train_profile/scaling.json "$OUT/train_05b.json" 2>/dev/null
find /tmp/train_profile -name "kernels_rank0.txt" -exec cp {} "$OUT/" \;
tail -3 "$OUT/train_05b.txt"; head -30 "$OUT/kernels_rank0.txt" 2>/dev/null | cut -c1-180
save_triton_cache
exit 0
