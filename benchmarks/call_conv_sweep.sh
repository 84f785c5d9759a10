# The conv + SiLU kernels alone at the 0.5B shape (benchmarks/kernel_bench.py, `falcon-bench --kernels conv`):
# the forward and backward tile sweep, the backward's pass 1 with its x windows kept or read again
# (conv_triton.BWD_RELOAD_WINDOWS) and on 1 or 3 pipeline stages (BWD_STAGES), against torch's conv.
#   device run: bash benchmarks/call_conv_sweep.sh     (carry: wheels, .triton_cache_tgz; timeout_s 240)
# Writes $OUT/conv.txt + conv.json. Pick the defaults in falcon_h1/kernels/conv_triton.py from it.
source benchmarks/device_setup.sh
run "${CONV_S:-180}" conv.txt python3 -m benchmarks.falcon_bench --variants "" --kernels conv --json "$OUT/conv.json"
grep -i "conv" "$OUT/conv.txt" | tail -30
