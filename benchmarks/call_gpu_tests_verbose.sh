#!/usr/bin/env bash
# One H200 call: each GPU test file on its own (-v, so a time-out still shows which tests passed and
# failed, with short tracebacks), then the decode-step profile.
#   device run: bash benchmarks/call_gpu_tests_verbose.sh     (carry: wheels)
set -uo pipefail
source benchmarks/device_setup.sh
for f in $(ls tests/*/test_*gpu*.py); do
  n=$(basename "$f" .py)
  timeout ${PER_FILE_S:-60} python3 -m pytest -v -p no:cacheprovider -p no:warnings --tb=short "$f" 2>&1 \
    | grep -v -i "warn" > "$OUT/$n.txt"
  grep -E "PASSED|FAILED|ERROR|SKIPPED" "$OUT/$n.txt" | sed 's/^tests\///' | cut -c1-150
done
timeout ${PROFILE_S:-90} python3 benchmarks/decode_profile.py --prompt-len 256 --new-tokens 8 --rows 18 2>&1 \
  | grep -v -i warn > "$OUT/decode_profile.txt"; tail -45 "$OUT/decode_profile.txt" | cut -c1-160
exit 0
