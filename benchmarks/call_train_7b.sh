# falcon-train (the loop users run) on one H200: the 7B at 1 x 4096 (eager, every layer recomputed: its
# fp32 gradients and AdamW state take 113 GiB of the card, recipes/memory_budget.py); then falcon-bench's
# graphed 0.5B step 4 x 4096, bf16 and BitNet b1.58 on the same weights (the backward keeping int8 inputs,
# then bf16 ones: bitnet.saved_input), interleaved, bf16 and int8 profiled over one replay (the kernels
# BitNet adds, by device time); the falcon-train 0.5B profile (CUDA-graphed, torch's
# profiler over two replayed steps: its kernels and the device's busy time against the wall time)
# where TRAIN_05B=1.
#   device run: bash benchmarks/call_train_7b.sh   (carry: wheels[, .triton_cache_tgz]; needs_h200; timeout_s 590)
# Writes $OUT/train_7b.txt + train_7b.json, bitnet_profile.txt + .json, [train_05b.txt + train_05b.json,
# kernels_rank0.txt], and Triton's cache under $OUT/triton_cache_tgz.
source benchmarks/device_setup.sh
run "${SEVEN_S:-300}" train_7b.txt python3 benchmarks/scaling.py run --work /tmp/train_7b --cases dp1 \
  --steps 6 --warmup 2 --dp-model falcon_h1_7b --dp-micro-batch 1 --override train.recompute=full --run-timeout-s 290
cp /tmp/train_7b/scaling.json "$OUT/train_7b.json" 2>/dev/null
tail -4 "$OUT/train_7b.txt"
# the profiled variants last (the profiler stays attached): the last int8 row's time is not a timing
G=_cuda_graph B8=ours_bitnet_fused_int8_input BF=ours_bitnet_fused_float_input
run "${BITNET_S:-200}" bitnet_profile.txt python3 -m benchmarks.falcon_bench --size 0.5b --steps 6 --kernels none \
  --variants "ours_fused$G,$B8$G,$BF$G,$B8$G,$BF$G,ours_fused$G,$B8$G" \
  --profile "ours_fused$G,$B8$G" --profile-top 45 \
  --json "$OUT/bitnet_profile.json"
grep -A8 "^variant" "$OUT/bitnet_profile.txt" | cut -c1-110
if [ "${TRAIN_05B:-0}" = 1 ]; then
run "${HALF_S:-220}" train_05b.txt python3 benchmarks/scaling.py run --work /tmp/train_profile --cases dp1 \
  --steps 12 --warmup 4 --cuda-graph --override train.profile_step_start=10 --override train.profile_step_end=11 \
  --run-timeout-s 210
cp /tmp/train_profile/scaling.json "$OUT/train_05b.json" 2>/dev/null
find /tmp/train_profile -name "kernels_rank0.txt" -exec cp {} "$OUT/" \;
tail -3 "$OUT/train_05b.txt"; head -30 "$OUT/kernels_rank0.txt" 2>/dev/null | cut -c1-180
fi
save_triton_cache
exit 0
