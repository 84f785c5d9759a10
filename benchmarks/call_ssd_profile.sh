# One device call that looks inside the project's own SSD kernels at 0.5B (benchmarks/ssd_bench.py):
#   device run: bash benchmarks/call_ssd_profile.sh   (carry: wheels, .triton_cache_tgz; timeout_s 600)
#   1. Nsight Compute on our forward and backward, one call each (speed of light, occupancy,
#      launch statistics, warp stalls, memory workload per kernel)
#   1b. with NCU_SOURCE=1: the token and dB/dC kernels again under ncu's full set with PC-sampled
#      stalls, saved as $OUT/ncu_source.ncu-rep and printed per SASS instruction to
#      ncu_source_sass.csv (these page flags were not yet tried on the device)
#   2. the backward's tile sweep at 0.5B
#   3. the bench at 7B without the float64 reference
#   4. Triton's cache back under $OUT/triton_cache_tgz (copy it to .triton_cache_tgz/ for the next call)
# Writes $OUT/ncu.txt, $OUT/ssd_bwd_sweep.txt, $OUT/ssd_7b.txt + ssd_7b.json.
source benchmarks/device_setup.sh
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
OURS='regex:^_(chunk_scan|chunk_state|state_passing|chunk_cb|token_gradients|bc_gradients|gated_dy_local_dstates|state_passing_bwd|chunk_reverse_cumsum)_kernel'
run "${NCU_S:-150}" ncu.txt "$NCU" --clock-control none -k "$OURS" --section SpeedOfLight --section Occupancy \
  --section LaunchStats --section WarpStateStats --section MemoryWorkloadAnalysis \
  python3 -m benchmarks.ssd_bench --own-once --shapes 0.5b
if [ -n "${NCU_SOURCE:-}" ]; then
  run "${NCU_SOURCE_S:-150}" ncu_source.txt "$NCU" --clock-control none --set full --import-source yes \
    -k 'regex:^_(token_gradients|bc_gradients)_kernel' -o "$OUT/ncu_source" \
    python3 -m benchmarks.ssd_bench --own-once --shapes 0.5b
  "$NCU" --import "$OUT/ncu_source.ncu-rep" --page source --print-source sass --csv > "$OUT/ncu_source_sass.csv" 2>&1
fi
run "${SSD_BWD_SWEEP_S:-200}" ssd_bwd_sweep.txt python3 -m benchmarks.ssd_bench --backward-sweep --shapes 0.5b
run "${SSD_7B_S:-120}" ssd_7b.txt python3 -m benchmarks.ssd_bench --shapes 7b --no-reference --json "$OUT/ssd_7b.json"
save_triton_cache
grep -E "^  _|Duration|Memory Throughput|DRAM Throughput|Compute \(SM\) Throughput|Registers Per|Achieved Occupancy|Theoretical Occupancy|Grid Size|Block Size|Shared Memory Config" "$OUT/ncu.txt" | head -150
grep "^sweep" "$OUT/ssd_bwd_sweep.txt"; grep "^TIMING" "$OUT/ssd_7b.txt"; tail -3 "$OUT/ssd_7b.txt"
