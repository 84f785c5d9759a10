# The gated-norm presets (mamba_rms_norm: 1.5B-Deep 4 x 4096, 7B 1 x 4096) on the fused Mamba branch
# against the Mamba path they took before it (unfused, µP multipliers on the activations, the gated
# norm op by op: falcon-bench's ours_fused_unfused_gated_norm), graphed and interleaved in one process
# per size (the Hugging Face ratios need its fast path: benchmarks/call_gpu_check.sh, BUILD=1):
#   device run: bash benchmarks/call_gated_norm_presets.sh   (carry: wheels, .triton_cache_tgz; timeout_s 600)
# Nothing else runs on the GPU while the steps are timed (benchmarks/NOTES.md, session 12).
# Writes $OUT/deep.txt + deep.json, 7b.txt + 7b.json, and Triton's cache under $OUT/triton_cache_tgz.
source benchmarks/device_setup.sh
pair=ours_fused_cuda_graph,ours_fused_unfused_gated_norm_cuda_graph
run "${DEEP_S:-260}" deep.txt python3 -m benchmarks.falcon_bench --size 1.5b-deep --steps 5 --kernels none \
  --variants "$pair,$pair" --json "$OUT/deep.json"
run "${SEVEN_S:-240}" 7b.txt python3 -m benchmarks.falcon_bench --size 7b --batch 1 --steps 5 --kernels none \
  --variants "$pair,$pair" --json "$OUT/7b.json"
save_triton_cache
grep -A5 "^variant" "$OUT/deep.txt" "$OUT/7b.txt"
