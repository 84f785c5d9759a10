# The graphed 0.5B step (falcon-bench, 4 x 4096) with KernelOptions switches on and off, interleaved
# in one process (A..E, then A..E again), then the GPU path tests (the fused branch, RoPE and the model
# against the reference path on the GPU), then the conv kernels' sweep:
#   device run: bash benchmarks/call_step_options.sh   (carry: wheels, .triton_cache_tgz; timeout_s 600)
#   VARIANTS: the variants (default: everything on; the in-projection's gradient concatenated; RoPE
#   op by op instead of the Triton kernel; torch's fused RMSNorm after a separate residual add; the conv
#   output kept for the backward instead of recomputed)
# Nothing else runs on the GPU while the steps are timed (benchmarks/NOTES.md, session 12).
# Writes $OUT/step.txt + step.json, gpu_paths.txt, conv.txt + conv.json; Triton's cache under
# $OUT/triton_cache_tgz (two parts: with device.txt, the 8 files a call returns), saved before the
# conv sweep, which comes last because a call cut at its limit keeps what finished.
source benchmarks/device_setup.sh
variants=${VARIANTS:-ours_fused_cuda_graph,ours_fused_concatenated_in_grad_cuda_graph,ours_fused_rope_op_by_op_cuda_graph,ours_fused_torch_norm_cuda_graph,ours_fused_keep_conv_cuda_graph}
run "${STEP_S:-340}" step.txt python3 -m benchmarks.falcon_bench --size 0.5b --steps 10 --kernels none \
  --variants "$variants,$variants" --json "$OUT/step.json"
run "${TESTS_S:-170}" gpu_paths.txt python3 -m pytest -q tests/falcon_h1/test_gpu_paths.py -p no:warnings --tb=short
save_triton_cache
grep -A11 "^variant" "$OUT/step.txt"; tail -4 "$OUT/gpu_paths.txt"
run "${CONV_S:-120}" conv.txt python3 -m benchmarks.falcon_bench --variants "" --kernels conv --json "$OUT/conv.json"
grep -i "conv" "$OUT/conv.txt" | tail -20
