# The graphed 0.5B step (falcon-bench, 4 x 4096) with a KernelOptions switch on and off, interleaved
# in one process (on, off, on, off), then the conv kernels' sweep, then the GPU path tests (the fused
# branch and model against the reference path on the GPU):
#   device run: bash benchmarks/call_step_options.sh   (carry: wheels, .triton_cache_tgz; timeout_s 600)
#   PAIR: the two variants (default: the shared in-projection gradient, against the concatenated one)
# Nothing else runs on the GPU while the steps are timed (benchmarks/NOTES.md, session 12).
# Writes $OUT/step.txt + step.json, conv.txt + conv.json, gpu_paths.txt; Triton's cache under
# $OUT/triton_cache_tgz (two parts: with device.txt, the 8 files a call returns).
source benchmarks/device_setup.sh
pair=${PAIR:-ours_fused_cuda_graph,ours_fused_concatenated_in_grad_cuda_graph}
run "${STEP_S:-200}" step.txt python3 -m benchmarks.falcon_bench --size 0.5b --steps 10 --kernels none \
  --variants "$pair,$pair" --json "$OUT/step.json"
run "${CONV_S:-150}" conv.txt python3 -m benchmarks.falcon_bench --variants "" --kernels conv --json "$OUT/conv.json"
run "${TESTS_S:-170}" gpu_paths.txt python3 -m pytest -q tests/falcon_h1/test_gpu_paths.py -p no:warnings --tb=short
save_triton_cache
grep -A5 "^variant" "$OUT/step.txt"; grep -i "conv" "$OUT/conv.txt" | tail -20; tail -4 "$OUT/gpu_paths.txt"
