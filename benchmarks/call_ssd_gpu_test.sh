# The GPU test of the own SSD kernels alone (tests/falcon_h1/test_ssd_own_gpu.py), on a carried
# Triton cache (benchmarks/device_setup.sh):
#   device run: bash benchmarks/call_ssd_gpu_test.sh   (carry: wheels, .triton_cache_tgz)
source benchmarks/device_setup.sh
timeout "${TESTS_S:-170}" python3 -m pytest -v tests/falcon_h1/test_ssd_own_gpu.py -p no:warnings --tb=short \
  --durations=0 2>&1 | tee "$OUT/ssd_gpu_tests.txt" | grep -E "PASS|FAIL|ERROR|passed|failed|assert|s call"
echo "exit ${PIPESTATUS[0]}" | tee -a "$OUT/ssd_gpu_tests.txt"
