# The graphed 0.5B step 4 x 4096 on any card, every row in one process: the defaults against
# CANDIDATE (a falcon-bench variant, required: a change to time, or a switch turned off), and BitNet
# b1.58 with the backward keeping int8 inputs and keeping the bf16 fake-quantised ones
# (bitnet.saved_input), interleaved twice; then Hugging Face's fast path for the ratio; then BitNet
# (int8) profiled over one replay (the profiler stays attached, so it comes last). Then the GPU tests
# of the candidates' kernels and of BitNet's weight quantiser (bf16 bit for bit, which the interpreter
# cannot check). The 2026-12-07 run timed the out-projection copy and one-launch RoPE, then off by
# default, as CANDIDATE=ours_fused_candidates (now `ours_fused` itself; the step before them is
# ours_fused_before_out_copy_and_rotary).
#   device run: CANDIDATE=variant bash benchmarks/call_step_candidates.sh   (carry: wheels, .whl,
#   .triton_cache_tgz; timeout_s 590)
# Writes $OUT/step.txt + step.json, gpu_tests.txt, and Triton's cache under $OUT/triton_cache_tgz.
source benchmarks/device_setup.sh
G=_cuda_graph B8=ours_bitnet_fused_int8_input BF=ours_bitnet_fused_float_input
CANDIDATE=${CANDIDATE:?"set CANDIDATE to the falcon-bench variant to time against the defaults"}
run "${STEP_S:-360}" step.txt python3 -m benchmarks.falcon_bench --size 0.5b --steps 8 --warmup 2 --kernels none \
  --variants "ours_fused$G,$CANDIDATE$G,$B8$G,$BF$G,ours_fused$G,$CANDIDATE$G,$B8$G,$BF$G,hf_transformers,$B8$G" \
  --profile "$B8$G" --profile-top 45 --json "$OUT/step.json"
grep -A11 "^variant" "$OUT/step.txt" | cut -c1-110; grep "hf_transformers ran" "$OUT/step.txt"
run "${TESTS_S:-150}" gpu_tests.txt python3 -m pytest -q -p no:warnings --tb=short tests/falcon_h1/test_gpu_paths.py \
  tests/bitnet/test_triton_gpu.py -k "${TESTS_K:-out_projection or rotary or weight_quant or layers_triton or cuda_graph or no_host_sync}"
tail -3 "$OUT/gpu_tests.txt"
save_triton_cache
exit 0
