# BitNet's activation quantiser reading each row once (bitnet.triton_kernels.READ_ROW_ONCE, off until
# timed) against walking it twice, at the 0.5B projections' input widths (16384 tokens;
# benchmarks.bitnet_bench), then the graphed 0.5B step 4 x 4096, bf16 and BitNet b1.58 on the same
# weights interleaved twice (falcon-bench; BitNet on the default form).
#   device run: bash benchmarks/call_bitnet_quant.sh   (carry: wheels, .triton_cache_tgz; timeout_s 300)
# Writes $OUT/quant_bench.txt, step.txt + step.json, and Triton's cache under $OUT/triton_cache_tgz.
source benchmarks/device_setup.sh
G=_cuda_graph
for k in 1024 2048; do
  timeout 60 python3 -m benchmarks.bitnet_bench --in-features $k --out-features 1024 2>&1 | grep -E "^NVIDIA|^  " \
    | tee -a "$OUT/quant_bench.txt"
done
run "${STEP_S:-200}" step.txt python3 -m benchmarks.falcon_bench --size 0.5b --steps 8 --warmup 2 --kernels none \
  --variants "ours_fused$G,ours_bitnet_fused$G,ours_fused$G,ours_bitnet_fused$G" --json "$OUT/step.json"
grep -A5 "^variant" "$OUT/step.txt" | cut -c1-110
save_triton_cache
exit 0
