# One call that returns what the next ones need and measures what needs no Hugging Face:
# causal_conv1d's CUDA extension builds in the background (the Hugging Face fast path's wheel, in
# <16 MB parts), while the GPU runs, one at a time: the conv kernels' microbenchmark (the two-pass
# and the one-pass streaming backward, and their tilings), the GPU conv tests, then the whole 0.5B
# step graphed with the two conv backwards interleaved, then falcon-train 0.5B 4 x 4096 graphed with
# the profiler over steps 10..11. The build uses CPU cores only; only graphed steps are timed.
#   device run: bash benchmarks/call_train_profile_and_build.sh   (carry: wheels [, .triton_cache_tgz]; timeout_s 600)
# Writes $OUT/conv_kernels.txt, conv_tests.txt, step_conv.txt + .json, train.txt, train.json, kernels_rank0.txt,
# cc1d.part* + cc1d_name.txt, and Triton's cache under $OUT/triton_cache_tgz.
source benchmarks/device_setup.sh
if [ "${BUILD:-1}" = 1 ]; then  # BUILD=0: no causal_conv1d build
  MAX_JOBS=${MAX_JOBS:-16} setsid bash benchmarks/build_causal_conv1d.sh wheels/causal_conv1d-1.7.0.tar.gz /tmp/cc1d \
    > "$OUT/cc1d_build.log" 2>&1 &
fi
run "${CONV_TESTS_S:-90}" conv_tests.txt python3 -m pytest -q -p no:warnings --tb=short tests/falcon_h1/test_gpu_paths.py -k "conv"
tail -3 "$OUT/conv_tests.txt"
run "${KERNELS_S:-100}" conv_kernels.txt python3 -m benchmarks.falcon_bench --variants "" --kernels conv --json "$OUT/conv_kernels.json"
grep -E "conv_triton_bwd|streaming|conv_bwd_tiles_32x128w4r64_s3" "$OUT/conv_kernels.txt" | head -12
pair=ours_fused_cuda_graph,ours_fused_streaming_conv_cuda_graph
run "${STEP_S:-150}" step_conv.txt python3 -m benchmarks.falcon_bench --size 0.5b --steps 10 --kernels none \
  --variants "$pair,$pair" --json "$OUT/step_conv.json"
grep -A5 "^variant" "$OUT/step_conv.txt" | cut -c1-110
if [ "${TRAIN_S:-200}" -gt 0 ]; then  # TRAIN_S=0: no falcon-train profile
  run "${TRAIN_S:-200}" train.txt python3 benchmarks/scaling.py run --work /tmp/train_profile --cases dp1 \
    --steps 12 --warmup 4 --cuda-graph --override train.profile_step_start=10 --override train.profile_step_end=11
  cp /tmp/train_profile/scaling.json "$OUT/train.json" 2>/dev/null
  find /tmp/train_profile -name "kernels_rank0.txt" -exec cp {} "$OUT/" \;
fi
save_triton_cache
[ "${BUILD:-1}" = 1 ] && while [ $SECONDS -lt "${BUILD_UNTIL_S:-575}" ] && ! ls /tmp/cc1d/*.whl >/dev/null 2>&1; do sleep 5; done
tail -2 "$OUT/cc1d_build.log"
for w in /tmp/cc1d/*.whl; do [ -f "$w" ] && basename "$w" > "$OUT/cc1d_name.txt" && split -b 15M -d "$w" "$OUT/cc1d.part"; done
[ -f "$OUT/train.txt" ] && tail -3 "$OUT/train.txt" && head -30 "$OUT/kernels_rank0.txt" | cut -c1-170
exit 0
