# Sourced by every device suite (benchmarks/*_suite.sh, call_probe.sh) as its first step:
# $OUT (the caller may set a default first), the environment, the carried wheels (wheels/, and
# .whl/ where a call carries it: causal_conv1d for the Hugging Face fast path), and
# $OUT/device.txt with the cards, driver and library versions, and run() (a step under its own time limit).
# Triton's compiled kernels and autotune choices persist across calls: a call that carries
# .triton_cache_tgz/ (the parts save_triton_cache wrote under $OUT last time, copied there)
# skips the minutes of compiling and autotuning mamba_ssm's kernels.
OUT=${OUT:-/tmp/falcon-gpu-out}
mkdir -p "$OUT"
# NVLink multicast stays off on the lent machines (the device tool's KINDS.md).
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-deps --no-index wheels/*.whl $(ls .whl/*.whl 2>/dev/null) 2>&1 | tail -2
{ nvidia-smi --query-gpu=index,name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/device.txt"
export TRITON_CACHE_DIR=$PWD/.triton_cache TRITON_CACHE_AUTOTUNING=1
if ls .triton_cache_tgz/part.* > /dev/null 2>&1; then
  mkdir -p "$TRITON_CACHE_DIR" && cat .triton_cache_tgz/part.* | tar xz -C "$TRITON_CACHE_DIR"
  echo "triton cache: $(ls "$TRITON_CACHE_DIR" | wc -l) entries carried" | tee -a "$OUT/device.txt"
fi
save_triton_cache() {  # into $OUT/triton_cache_tgz/part.* (each under the 16 MB a returned file may hold)
  # A cache hit loads only the binary and its metadata (Triton skips a group's missing files): the
  # intermediate IRs and the source, four fifths of the bytes, stay behind so the parts fit in a call.
  find "$TRITON_CACHE_DIR" -type f \( -name '*.llir' -o -name '*.ptx' -o -name '*.ttir' -o -name '*.ttgir' \
    -o -name '*.source' \) -delete
  mkdir -p "$OUT/triton_cache_tgz"
  tar cz -C "$TRITON_CACHE_DIR" . | split -b 15M - "$OUT/triton_cache_tgz/part."
  du -sh "$OUT/triton_cache_tgz"
}
run() {  # seconds, output file under $OUT, command...: each step under its own time limit
  local limit=$1 out=$2; shift 2
  timeout "$limit" "$@" > "$OUT/$out" 2>&1
  echo "exit $?" >> "$OUT/$out"
}
train_05b_profile() {  # falcon-train 0.5B 4 x 4096, CUDA-graphed, torch's profiler over steps 10-11: its kernels
  # and the device's busy time against the wall time ($OUT/train_05b.txt + .json, kernels_rank0.txt)
  run "${HALF_S:-220}" train_05b.txt python3 benchmarks/scaling.py run --work /tmp/train_profile --cases dp1 \
    --steps 12 --warmup 4 --cuda-graph --override train.profile_step_start=10 \
    --override train.profile_step_end=11 --run-timeout-s 210
  cp /tmp/train_profile/scaling.json "$OUT/train_05b.json" 2>/dev/null
  find /tmp/train_profile -name "kernels_rank0.txt" -exec cp {} "$OUT/" \;
  tail -3 "$OUT/train_05b.txt"; head -30 "$OUT/kernels_rank0.txt" 2>/dev/null | cut -c1-180
}
