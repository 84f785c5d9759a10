#!/usr/bin/env bash
# The closing GPU call: GPU tests (Falcon-H1 fast path vs reference, BitNet Triton kernels),
# then the step benchmark at batch 4 (ours old/new, BitNet vs bf16) and at batch 1 (ours vs
# Hugging Face transformers and vs the unfused two-branch model with unfused attention, which
# both run out of memory at batch 4 on the H200).
#   device run: bash benchmarks/final_suite.sh     (carry: wheels)
set -uo pipefail
OUT=${OUT:-/tmp/falcon-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
python3 -m pip install -q --no-deps --no-index wheels/*.whl 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
timeout 240 python3 -m pytest -q -p no:cacheprovider -p no:warnings --tb=line \
  tests/falcon_h1/test_gpu_paths.py tests/bitnet/test_triton_gpu.py 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"
python3 -m falcon_h1.bench --size 0.5b --seq 4096 --batch 4 --steps 5 --warmup 3 --kernels none \
  --variants ours_fused_prev,ours_fused,ours_bitnet_fused,ours_bitnet_reference_ste \
  --json "$OUT/bench_b4.json" 2>&1 | grep -v -i warn | tail -9 | tee "$OUT/bench_b4.txt"
python3 -m falcon_h1.bench --size 0.5b --seq 4096 --batch 1 --steps 5 --warmup 2 --kernels none \
  --variants ours_fused,ours_unfused_unfused_attention,hf_transformers \
  --json "$OUT/bench_b1.json" 2>&1 | grep -v -i warn | tail -7 | tee "$OUT/bench_b1.txt"
