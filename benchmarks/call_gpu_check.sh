#!/usr/bin/env bash
# One H200 call: FIRST_TESTS (test ids, each in its own pytest, whole tracebacks), then every GPU
# test (or TESTS; TESTS=skip for none) over XDIST workers (-v, short tracebacks, to $OUT/gpu_tests.txt; the slow
# SLOW ones beside them to $OUT/gpu_tests_slow.txt),
# then AFTER (eval'd), then decode speed of falcon_h1.generate with and without its CUDA graph (GEN_ARGS), while
# causal_conv1d's CUDA extension builds in the background for the Hugging Face fast path (BUILD=1;
# the wheel comes back in <16 MB parts: cat $OUT/cc1d.part* > causal_conv1d-...whl).
#   device run: bash benchmarks/call_gpu_check.sh     (carry: wheels [, .whl])
set -uo pipefail
source benchmarks/device_setup.sh
if [ "${BUILD:-0}" = 1 ]; then
  setsid bash -c "bash benchmarks/build_causal_conv1d.sh wheels/causal_conv1d-1.7.0.tar.gz /tmp/cc1d > $OUT/cc1d_build.log 2>&1" &
fi
if [ -n "${FIRST_TESTS:-}" ]; then  # known failures first, one pytest each: its traceback is written when it ends
  for test in $FIRST_TESTS; do
    timeout ${FIRST_S:-150} python3 -m pytest -v -s -p no:cacheprovider -p no:warnings --tb=long -rfE "$test" 2>&1 \
      | grep -v -i "warn" >> "$OUT/first_tests.txt"
  done
  grep -E "FAILED|ERROR|passed|failed|Error" "$OUT/first_tests.txt" | cut -c1-200 | tail -12
fi
if [ "${TESTS:-}" != skip ]; then
  # several workers: a fresh machine's time goes to compiling Triton kernels, one CPU core each.
  # With every GPU test (TESTS unset), the whole-model packed-row tests (~180 s each, compiling)
  # start at once on workers of their own (SLOW, SLOW_XDIST) instead of queueing behind the rest.
  pytest_gpu() { timeout ${TESTS_S:-330} python3 -m pytest -v --dist load -p no:cacheprovider -p no:warnings \
    --tb=short -rfE --durations=12 "$@" 2>&1 | grep -v -i "warn"; }
  slow=${SLOW:-tests/falcon_h1/test_gpu_paths.py::test_model_packed_row_equals_each_document_alone_on_the_fast_path}
  if [ -z "${TESTS:-}" ] && [ "$slow" != none ]; then
    pytest_gpu -n ${SLOW_XDIST:-3} "$slow" > "$OUT/gpu_tests_slow.txt" &
    pytest_gpu -n ${XDIST:-8} --deselect "$slow" $(ls tests/*/test_*gpu*.py) ${EXTRA_TESTS:-} > "$OUT/gpu_tests.txt"
    wait
    grep -E "FAILED|ERROR|passed|failed" "$OUT/gpu_tests_slow.txt" | cut -c1-200 | tail -6
  else
    pytest_gpu -n ${XDIST:-8} ${TESTS:-$(ls tests/*/test_*gpu*.py)} ${EXTRA_TESTS:-} > "$OUT/gpu_tests.txt"
  fi
  grep -E "FAILED|ERROR|passed|failed" "$OUT/gpu_tests.txt" | cut -c1-200 | tail -25
fi
eval "${AFTER:-true}"  # e.g. another bench, before the decode run
left=$((560 - SECONDS))
if [ "$left" -gt 40 ] && [ "${GEN_ARGS:-}" != skip ]; then
  timeout $left python3 benchmarks/generate_bench.py --out "$OUT" ${GEN_ARGS:---sizes 0.5b --batches 1 --new-tokens 64 --no-hf} \
    2>&1 | grep -v -i warn | tail -12
fi
if [ "${BUILD:-0}" = 1 ]; then
  while [ $SECONDS -lt 585 ] && ! ls /tmp/cc1d/*.whl >/dev/null 2>&1; do sleep 5; done
  tail -3 "$OUT/cc1d_build.log"
  for w in /tmp/cc1d/*.whl; do [ -f "$w" ] && basename "$w" > "$OUT/cc1d_name.txt" && split -b 15M -d "$w" "$OUT/cc1d.part"; done
fi
exit 0
