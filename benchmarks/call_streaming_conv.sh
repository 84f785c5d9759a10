# The streaming conv kernels (KernelOptions.streaming_conv, the default) on the GPU against the tiled ones
# (falcon-bench variant ours_fused_tiled_conv; the 2026-12-07 run named the pair ours_fused and
# ours_fused_streaming_conv, before the default changed): the whole 0.5B step 4 x 4096 graphed with
# each, interleaved around Hugging Face's fast path (mamba_ssm's fused split-conv1d-scan + causal_conv1d)
# and the BitNet step on the same weights in the same process;
# then the conv GPU tests; then 1.5B-Deep 4 x 4096 the same way (without BitNet); the conv kernels'
# microbenchmark (tiled against streaming, and their tilings) last, where KERNELS=1.
#   device run: [CANDIDATE=variant] bash benchmarks/call_streaming_conv.sh   (carry: wheels, .whl,
#   .triton_cache_tgz; timeout_s 590). CANDIDATE (default ours_fused_tiled_conv) replaces the tiled conv
#   in the pairs above.
# .whl/ holds causal_conv1d's wheel for torch 2.11 + CUDA 13, sm_90 (bash benchmarks/build_causal_conv1d_here.sh
# builds it without a GPU; wheels/ from bash benchmarks/device_wheels.sh); without it HF runs its PyTorch fallback.
# Writes $OUT/step.txt + step.json, conv_tests.txt, deep.txt + deep.json, [conv_kernels.txt + .json], and
# Triton's cache under $OUT/triton_cache_tgz (copy it to .triton_cache_tgz/ and carry it: the next call
# skips the compiling).
source benchmarks/device_setup.sh
G=_cuda_graph
# the variant set against the defaults (any falcon-bench variant, e.g. ours_fused_torch_cat_out_input)
CANDIDATE=${CANDIDATE:-ours_fused_tiled_conv}
run "${STEP_S:-230}" step.txt python3 -m benchmarks.falcon_bench --size 0.5b --steps 10 --kernels none \
  --variants "ours_fused$G,$CANDIDATE$G,hf_transformers,ours_bitnet_fused$G,ours_fused$G,$CANDIDATE$G" \
  --json "$OUT/step.json"
grep -A7 "^variant" "$OUT/step.txt" | cut -c1-110; grep "hf_transformers ran" "$OUT/step.txt"
run "${CONV_TESTS_S:-80}" conv_tests.txt python3 -m pytest -q -p no:warnings --tb=short tests/falcon_h1/test_gpu_paths.py -k "conv or out_projection"
tail -3 "$OUT/conv_tests.txt"
run "${DEEP_S:-200}" deep.txt python3 -m benchmarks.falcon_bench --size 1.5b-deep --steps 5 --kernels none \
  --variants "ours_fused$G,$CANDIDATE$G,hf_transformers,ours_fused$G,$CANDIDATE$G" \
  --json "$OUT/deep.json"
grep -A6 "^variant" "$OUT/deep.txt" | cut -c1-110
if [ "${KERNELS:-0}" = 1 ]; then
  run "${KERNELS_S:-80}" conv_kernels.txt python3 -m benchmarks.falcon_bench --variants "" --kernels conv --json "$OUT/conv_kernels.json"
  grep -E "conv_triton_(fwd|bwd)|streaming|tiles_32x128w4r64_s3" "$OUT/conv_kernels.txt" | head -20
fi
save_triton_cache
exit 0
