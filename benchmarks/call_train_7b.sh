# On one H200 (the Hugging Face 1.5B-Deep step and the 7B runs do not fit 80 GB), the parts named in
# PARTS (default "deep train_05b"; one call cannot hold all four):
#   deep       falcon-bench's graphed 1.5B-Deep step 4 x 4096 around Hugging Face's fast path
#              (mamba_ssm's fused split-conv1d-scan + causal_conv1d, eager) in one process, for the ratio;
#   bench_7b   falcon-bench's graphed 7B step at 1 x 4096 (its MFU);
#   train_7b   falcon-train (the loop users run) on the 7B at 1 x 4096 (eager, every layer recomputed: its
#              fp32 gradients and AdamW state take 113 GiB of the card, recipes/memory_budget.py);
#   train_05b  the falcon-train 0.5B profile (CUDA-graphed, torch's profiler over two replayed steps: its
#              kernels and the device's busy time against the wall time).
#   device run: PARTS="..." bash benchmarks/call_train_7b.sh   (carry: wheels, .whl[, .triton_cache_tgz];
#   needs_h200; timeout_s 590)
# Writes $OUT/<part>.txt (+ .json; train_05b also kernels_rank0.txt) and Triton's cache under
# $OUT/triton_cache_tgz.
source benchmarks/device_setup.sh
G=_cuda_graph
for part in ${PARTS:-deep train_05b}; do
  case $part in
    deep)
      run "${DEEP_S:-200}" deep.txt python3 -m benchmarks.falcon_bench --size 1.5b-deep --steps 5 --kernels none \
        --variants "ours_fused$G,hf_transformers,ours_fused$G" --json "$OUT/deep.json"
      grep -A4 "^variant" "$OUT/deep.txt" | cut -c1-110; grep "hf_transformers ran" "$OUT/deep.txt" ;;
    bench_7b)
      run "${BENCH_7B_S:-240}" bench_7b.txt python3 -m benchmarks.falcon_bench --size 7b --batch 1 --steps 5 \
        --kernels none --variants "ours_fused$G,ours_fused$G" --json "$OUT/bench_7b.json"
      grep -A3 "^variant" "$OUT/bench_7b.txt" | cut -c1-110 ;;
    train_7b)
      run "${SEVEN_S:-300}" train_7b.txt python3 benchmarks/scaling.py run --work /tmp/train_7b --cases dp1 \
        --steps 6 --warmup 2 --dp-model falcon_h1_7b --dp-micro-batch 1 --override train.recompute=full \
        --run-timeout-s 290
      cp /tmp/train_7b/scaling.json "$OUT/train_7b.json" 2>/dev/null
      tail -4 "$OUT/train_7b.txt" ;;
    train_05b) train_05b_profile ;;
    *) echo "PARTS: $part is not one of deep, bench_7b, train_7b, train_05b"; exit 2 ;;
  esac
done
save_triton_cache
exit 0
