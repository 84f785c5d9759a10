#!/usr/bin/env bash
# One H200 call: packed vs unpacked chat rows (0.5B, 4 x 4096), then the long-context table: 0.5B at
# 32K (ours and HF, each without and with full recompute) and 128K (the first 12 layers recomputed, all
# of them, HF's checkpointing), one falcon-bench
# run per length (HF on its fast path needs causal_conv1d's wheel in .whl/).
#   device run: bash benchmarks/call_long_context.sh     (carry: wheels, .whl)
set -uo pipefail
source benchmarks/device_setup.sh
eval "${BEFORE:-true}"
timeout ${PACKED_S:-150} python3 -m benchmarks.packed_throughput_bench --packed-attention flex sdpa --steps 5 \
  --json "$OUT/packed_throughput.json" 2>&1 | grep -v -i warn | tail -12
bench() {  # length, variants, seconds
  timeout $3 python3 -m benchmarks.falcon_bench --size ${SIZE:-0.5b} --seq $1 --batch 1 --steps 3 --warmup 2 \
    --kernels none --variant-timeout ${VARIANT_S:-90} --variants "$2" --json "$OUT/long_$1.json" 2>&1 | grep -v -i warn | grep -E '^\{|ours|hf' | cut -c1-260 | tail -8
}
bench 32768 ${V32:-ours_fused,hf_transformers,ours_fused_recompute_full,hf_transformers_checkpointing} ${S32:-150}
bench 131072 ${V128:-ours_fused_recompute_12,ours_fused_recompute_full,hf_transformers_checkpointing} ${S128:-180}
exit 0
