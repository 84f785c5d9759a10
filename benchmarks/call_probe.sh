#!/usr/bin/env bash
# Probe call: build causal_conv1d for the HF baseline in the background while the
# GPU tests and a short 8-layer benchmark check the new paths (CUDA graph, fused Mamba branch,
# two-pass conv backward). Timings here share the CPU with the build: correctness only.
#   device run: bash benchmarks/call_probe.sh     (carry: wheels, .whl)
set -uo pipefail
source benchmarks/device_setup.sh
which nvcc; ls /usr/local/cuda/bin/nvcc 2>&1; nproc; python3 -c "import transformers; print(transformers.__version__)"
setsid bash benchmarks/build_causal_conv1d.sh .whl/causal_conv1d-1.7.0.tar.gz /tmp/ccw > /tmp/ccbuild.log 2>&1 < /dev/null &
timeout 300 python3 -m pytest -q -p no:cacheprovider -p no:warnings --tb=short -x \
  tests/falcon_h1/test_gpu_paths.py $(ls tests/recipes/test_cuda_graph_gpu.py 2>/dev/null) 2>&1 | tail -30 | tee "$OUT/gpu_tests.txt"
python3 -m benchmarks.falcon_bench --size 0.5b --layers 8 --seq 4096 --batch 4 --steps 5 --warmup 3 --kernels conv \
  --variants ours_fused_options_off,ours_fused_no_branch_fn,ours_fused_no_fused_norm,ours_fused,ours_fused_cuda_graph \
  --json "$OUT/probe_bench.json" 2>&1 | grep -v -i warn | tail -25 | tee "$OUT/probe_bench.txt"
while [ $SECONDS -lt 520 ]; do ls /tmp/ccw/*.whl >/dev/null 2>&1 && break; pgrep -f "pip wheel" >/dev/null || break; sleep 5; done
tail -5 /tmp/ccbuild.log; cp /tmp/ccbuild.log "$OUT/ccbuild.log"
if ls /tmp/ccw/*.whl >/dev/null 2>&1; then
  whl=$(ls /tmp/ccw/*.whl); echo "$(basename $whl)" > "$OUT/cc_wheel_name.txt"
  split -b 15M "$whl" "$OUT/ccwhl.part."
  python3 -m pip install -q --no-deps --no-index "$whl" && python3 -m benchmarks.falcon_bench --size 0.5b --layers 4 \
    --batch 1 --steps 3 --warmup 2 --kernels none --variants ours_fused,hf_transformers 2>&1 | grep -v -i warn | tail -8
fi
