# One device call for the project's own SSD kernels against mamba_ssm's (benchmarks/ssd_bench.py):
#   device run: bash benchmarks/call_ssd.sh     (carry: wheels)
# Each step has its own time limit, so a slow step cannot take the others' results with it:
#   1. the bench at the 0.5B, 7B and packed 0.5B shapes (errors vs float64, GPU ms, per-kernel ms)
#   2. the GPU test of the own kernels (tests/falcon_h1/test_ssd_own_gpu.py)
#   3. the forward's tile sweep at 0.5B and 7B
# Writes $OUT/ssd.txt + ssd.json, $OUT/ssd_gpu_tests.txt, $OUT/ssd_sweep.txt.
source benchmarks/device_setup.sh
SSD_BENCH_S=${SSD_BENCH_S:-240} SSD_TESTS_S=${SSD_TESTS_S:-150} SSD_SWEEP_S=${SSD_SWEEP_S:-150}
timeout "$SSD_BENCH_S" python3 -m benchmarks.ssd_bench --shapes 0.5b 7b 0.5b_packed --json "$OUT/ssd.json" \
  > "$OUT/ssd.txt" 2>&1
echo "exit $?" >> "$OUT/ssd.txt"
timeout "$SSD_TESTS_S" python3 -m pytest -v tests/falcon_h1/test_ssd_own_gpu.py -p no:warnings --tb=short \
  > "$OUT/ssd_gpu_tests.txt" 2>&1
echo "exit $?" >> "$OUT/ssd_gpu_tests.txt"
timeout "$SSD_SWEEP_S" python3 -m benchmarks.ssd_bench --forward-sweep --shapes 0.5b 7b > "$OUT/ssd_sweep.txt" 2>&1
echo "exit $?" >> "$OUT/ssd_sweep.txt"
grep -A8 "^shape" "$OUT/ssd.txt"; tail -8 "$OUT/ssd_gpu_tests.txt"; grep "^sweep" "$OUT/ssd_sweep.txt"
