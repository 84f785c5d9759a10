# One device call for the project's own SSD kernels against mamba_ssm's (benchmarks/ssd_bench.py):
#   device run: bash benchmarks/call_ssd.sh     (carry: wheels; timeout_s 600)
# Each step has its own time limit, so a slow step cannot take the others' results with it:
#   1. the bench at the 0.5B, 7B and packed 0.5B shapes (GPU ms and per-kernel ms first, then the
#      errors against float64)
#   2. the backward's tile sweep at 0.5B
#   3. the GPU test of the own kernels (tests/falcon_h1/test_ssd_own_gpu.py)
#   4. the forward's tile sweep at 7B
# Writes $OUT/ssd.txt + ssd.json, $OUT/ssd_bwd_sweep.txt, $OUT/ssd_gpu_tests.txt, $OUT/ssd_fwd_sweep.txt.
source benchmarks/device_setup.sh
run() {  # seconds, output file, command...
  local limit=$1 out=$2; shift 2
  timeout "$limit" "$@" > "$OUT/$out" 2>&1
  echo "exit $?" >> "$OUT/$out"
}
run "${SSD_BENCH_S:-230}" ssd.txt python3 -m benchmarks.ssd_bench --shapes 0.5b 7b 0.5b_packed --json "$OUT/ssd.json"
run "${SSD_BWD_SWEEP_S:-150}" ssd_bwd_sweep.txt python3 -m benchmarks.ssd_bench --backward-sweep --shapes 0.5b
run "${SSD_TESTS_S:-120}" ssd_gpu_tests.txt python3 -m pytest -v tests/falcon_h1/test_ssd_own_gpu.py -p no:warnings --tb=short
run "${SSD_FWD_SWEEP_S:-80}" ssd_fwd_sweep.txt python3 -m benchmarks.ssd_bench --forward-sweep --shapes 7b
grep "^TIMING" "$OUT/ssd.txt"; grep -A8 "^shape" "$OUT/ssd.txt"; grep "^sweep" "$OUT"/ssd_*_sweep.txt
tail -8 "$OUT/ssd_gpu_tests.txt"
