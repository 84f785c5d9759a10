# Where the whole 0.5B step's time goes with mamba_ssm's SSD kernels against the project's own:
#   device run: bash benchmarks/call_ssd_step_profile.sh   (carry: wheels, .triton_cache_tgz; timeout_s 480)
#   1. falcon-bench 0.5B 4 x 4096: mamba_ssm's combined backward (ours_fused_ssd_recompute) timed, then
#      mamba_ssm from the kept states (ours_fused) and own kernels, each timed and one step profiled
#   2. ours_fused again on an empty Triton cache with no carried autotune choices, so a choice
#      carried from an earlier call (one made under a profiler, say) shows as a difference from 1.
#   3. the carried cache back under $OUT/triton_cache_tgz
# Writes $OUT/profile.txt + .json, fresh.txt + .json.
source benchmarks/device_setup.sh
run "${PROFILE_S:-170}" profile.txt python3 -m benchmarks.falcon_bench --size 0.5b --steps 10 --kernels none \
  --variants ours_fused_ssd_recompute,ours_fused,ours_fused_own_ssd --profile ours_fused,ours_fused_own_ssd \
  --json "$OUT/profile.json"
(export TRITON_CACHE_DIR=$PWD/.triton_cache_empty; unset TRITON_CACHE_AUTOTUNING
 run "${FRESH_S:-200}" fresh.txt python3 -m benchmarks.falcon_bench --size 0.5b --steps 10 --kernels none \
   --variants ours_fused,ours_fused_own_ssd --json "$OUT/fresh.json")
save_triton_cache
grep -A70 "^variant" "$OUT/profile.txt"; grep -A4 "^variant" "$OUT/fresh.txt"; tail -3 "$OUT/fresh.txt"
