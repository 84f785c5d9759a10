# The graphed 0.5B step 4 x 4096 on any card: the defaults against CANDIDATE (falcon-bench variants,
# comma-separated: a change to time, or a switch turned off), interleaved twice in one process, then the defaults
# profiled over one replay (the profiler stays attached, so it comes last); then falcon-train's 0.5B
# profile (device_setup.sh's train_05b_profile: the loop's device-busy time against its wall time);
# then the GPU tests TESTS names (pytest node ids or files; none when empty). KERNELS: falcon-bench's
# kernel microbenchmarks after the steps (default none; conv: the conv tile sweeps). HF=1 adds Hugging
# Face's fast path (eager) before the last defaults row, for the ratio (carry .whl too).
#   device run: CANDIDATE=variant [TESTS="..."] [KERNELS=conv] bash benchmarks/call_step_pair.sh   (carry: wheels,
#   .triton_cache_tgz; timeout_s 590)
# Writes $OUT/step.txt + step.json, train_05b.txt + train_05b.json + kernels_rank0.txt, gpu_tests.txt,
# and Triton's cache under $OUT/triton_cache_tgz.
source benchmarks/device_setup.sh
G=_cuda_graph
CANDIDATE=${CANDIDATE:?"set CANDIDATE to the falcon-bench variant(s) to time against the defaults"}
row="ours_fused$G"
for c in ${CANDIDATE//,/ }; do row="$row,$c$G"; done
run "${STEP_S:-240}" step.txt python3 -m benchmarks.falcon_bench --size 0.5b --steps 8 --warmup 2 --kernels "${KERNELS:-none}" \
  --variants "$row,$row${HF:+,hf_transformers},ours_fused$G" \
  --profile "ours_fused$G" --profile-top 60 --json "$OUT/step.json"
grep -A10 "^variant" "$OUT/step.txt" | cut -c1-110; grep "hf_transformers ran" "$OUT/step.txt"; grep "  kernel conv" "$OUT/step.txt"
train_05b_profile
if [ -n "${TESTS:-}" ]; then
  run "${TESTS_S:-150}" gpu_tests.txt python3 -m pytest -q -p no:warnings --tb=short $TESTS
  tail -3 "$OUT/gpu_tests.txt"
fi
save_triton_cache
exit 0
