# Sourced by every device suite (benchmarks/*_suite.sh, call_probe.sh) as its first step:
# $OUT (the caller may set a default first), the environment, the carried wheels (wheels/, and
# .whl/ where a call carries it: causal_conv1d for the Hugging Face fast path), and
# $OUT/device.txt with the cards, driver and library versions.
OUT=${OUT:-/tmp/falcon-gpu-out}
mkdir -p "$OUT"
# NVLink multicast stays off on the lent machines (the device tool's KINDS.md).
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-deps --no-index wheels/*.whl $(ls .whl/*.whl 2>/dev/null) 2>&1 | tail -2
{ nvidia-smi --query-gpu=index,name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/device.txt"
