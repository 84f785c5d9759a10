#!/usr/bin/env bash
# What one device call runs on the GPU machine (see benchmarks/README.md):
# install the carried wheels, run the GPU tests, then falcon-bench. Results land in $OUT.
#   device run: bash benchmarks/gpu_suite.sh [quick|full]     (carry: wheels)
set -uo pipefail
MODE=${1:-quick}
OUT=${OUT:-/tmp/falcon-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
python3 -m pip install -q --no-deps --no-index wheels/*.whl 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
TESTS="tests/falcon_h1/test_gpu_paths.py"
[ "$MODE" = quick ] && TESTS="$TESTS tests/bitnet"
python3 -m pytest -q -p no:cacheprovider -p no:warnings --tb=short $TESTS 2>&1 | tail -60 | tee "$OUT/gpu_tests.txt"
if [ "$MODE" = quick ]; then
  python3 -m falcon_h1.bench --layers 2 --seq 2048 --batch 2 --steps 3 --warmup 2 \
    --variants ours_fused,ours_fused_compiled,ours_unfused_unfused_attention,hf_transformers,ours_bf16_random_init,ours_bitnet_fused,ours_bitnet_reference_ste \
    --json "$OUT/bench_quick.json" 2>&1 | grep -v Warning | tail -30 | tee "$OUT/bench_quick.txt"
else
  python3 -m falcon_h1.bench --size 0.5b --seq 4096 --batch 4 --steps 5 --warmup 3 \
    --variants ${VARIANTS:-ours_fused,ours_fused_compiled,ours_unfused_unfused_attention,hf_transformers,ours_bf16_random_init,ours_bitnet_fused,ours_bitnet_reference_ste} \
    --json "$OUT/bench_full.json" 2>&1 | grep -v Warning | tail -30 | tee "$OUT/bench_full.txt"
fi
