# Issue 17's ratios, each against Hugging Face's fast path (mamba_ssm's fused split-conv1d-scan +
# causal_conv1d's CUDA extension) on the same weights in the same process: 0.5B 4 x 4096 (ours graphed,
# BitNet graphed, interleaved around HF), 1.5B-Deep 4 x 4096, then 7B 1 x 4096 where SIZES names it
# (SIZES default "0.5b,1.5b-deep"). Only graphed steps of ours are timed; HF runs eager, as its users do.
#   device run: bash benchmarks/call_hf_ratios.sh   (carry: wheels, .whl, .triton_cache_tgz; timeout_s 600)
# .whl/ holds causal_conv1d's wheel (benchmarks/build_causal_conv1d_here.sh builds it without a GPU).
# Writes $OUT/<size>.txt + <size>.json, and Triton's cache under $OUT/triton_cache_tgz.
source benchmarks/device_setup.sh
G=_cuda_graph
SIZES=${SIZES:-0.5b,1.5b-deep}
for size in ${SIZES//,/ }; do
  case $size in
    0.5b) args="--batch 4" variants="ours_fused$G,ours_bitnet_fused$G,hf_transformers,ours_fused$G,ours_bitnet_fused$G" limit=${S05:-200} ;;
    1.5b-deep) args="--batch 4" variants="ours_fused$G,hf_transformers,ours_fused$G" limit=${SDEEP:-200} ;;
    7b) args="--batch 1" variants="ours_fused$G,hf_transformers,ours_fused$G" limit=${S7:-200} ;;
    *) echo "SIZES: $size is not one of 0.5b, 1.5b-deep, 7b"; exit 2 ;;
  esac
  run "$limit" "$size.txt" python3 -m benchmarks.falcon_bench --size "$size" $args --steps 5 --kernels none \
    --variants "$variants" --json "$OUT/$size.json"
  grep -A7 "^variant" "$OUT/$size.txt" | cut -c1-110
done
save_triton_cache
exit 0
