# One device call that tunes the own SSD backward's tiles at one shape (SHAPE: 0.5b, or 7b, ...) and
# then measures the result (benchmarks/ssd_bench.py):
#   device run: [SHAPE=7b] bash benchmarks/call_ssd_tune.sh   (carry: wheels, .triton_cache_tgz; timeout_s 600)
#   1. the backward's tile sweep (BACKWARD_SWEEP, one process a setting)
#   2. the bench at that shape (ours vs mamba_ssm, float64 errors) with the sweep's fastest setting of
#      each kernel combined (best_of_sweep), printed as BEST
#   3. the GPU test of the own kernels (tests/falcon_h1/test_ssd_own_gpu.py, default tiles)
#   4. Triton's cache back under $OUT
# Writes $OUT/ssd_bwd_sweep.txt + .json, ssd_tuned.txt + .json, ssd_gpu_tests.txt.
source benchmarks/device_setup.sh
SHAPE=${SHAPE:-0.5b}
run "${SWEEP_S:-200}" ssd_bwd_sweep.txt python3 -m benchmarks.ssd_bench --backward-sweep --shapes "$SHAPE" \
  --json "$OUT/ssd_bwd_sweep.json"
BEST=$(python3 -m benchmarks.ssd_bench --best-of-sweep "$OUT/ssd_bwd_sweep.json" 2>/dev/null || echo '{}')
echo "BEST $BEST" | tee "$OUT/best.txt"
run "${TUNED_S:-110}" ssd_tuned.txt python3 -m benchmarks.ssd_bench --shapes "$SHAPE" --backward-blocks "$BEST" \
  --json "$OUT/ssd_tuned.json"
run "${TESTS_S:-120}" ssd_gpu_tests.txt python3 -m pytest -v tests/falcon_h1/test_ssd_own_gpu.py -p no:warnings --tb=short

save_triton_cache
grep "^sweep" "$OUT/ssd_bwd_sweep.txt"; cat "$OUT/best.txt"; grep -A6 "^shape" "$OUT/ssd_tuned.txt"
grep "^TIMING" "$OUT"/ssd_*.txt; tail -6 "$OUT/ssd_gpu_tests.txt"
