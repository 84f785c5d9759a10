# On one H200 (the Hugging Face 1.5B-Deep step and the 7B falcon-train do not fit 80 GB): falcon-bench's
# graphed 1.5B-Deep step 4 x 4096 around Hugging Face's fast path (mamba_ssm's fused split-conv1d-scan +
# causal_conv1d, eager) in one process, for the ratio; then falcon-train (the loop users run) on the 7B
# at 1 x 4096 (eager, every layer recomputed: its fp32 gradients and AdamW state take 113 GiB of the
# card, recipes/memory_budget.py); the falcon-train 0.5B profile (CUDA-graphed, torch's profiler over two
# replayed steps: its kernels and the device's busy time against the wall time) where TRAIN_05B=1.
#   device run: bash benchmarks/call_train_7b.sh   (carry: wheels, .whl[, .triton_cache_tgz]; needs_h200;
#   timeout_s 590)
# Writes $OUT/deep.txt + deep.json, train_7b.txt + train_7b.json, [train_05b.txt + train_05b.json,
# kernels_rank0.txt], and Triton's cache under $OUT/triton_cache_tgz.
source benchmarks/device_setup.sh
G=_cuda_graph
run "${DEEP_S:-200}" deep.txt python3 -m benchmarks.falcon_bench --size 1.5b-deep --steps 5 --kernels none \
  --variants "ours_fused$G,hf_transformers,ours_fused$G" --json "$OUT/deep.json"
grep -A4 "^variant" "$OUT/deep.txt" | cut -c1-110; grep "hf_transformers ran" "$OUT/deep.txt"
run "${SEVEN_S:-300}" train_7b.txt python3 benchmarks/scaling.py run --work /tmp/train_7b --cases dp1 \
  --steps 6 --warmup 2 --dp-model falcon_h1_7b --dp-micro-batch 1 --override train.recompute=full --run-timeout-s 290
cp /tmp/train_7b/scaling.json "$OUT/train_7b.json" 2>/dev/null
tail -4 "$OUT/train_7b.txt"
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
