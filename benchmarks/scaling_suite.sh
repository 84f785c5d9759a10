#!/usr/bin/env bash
# Multi-GPU scaling of falcon-train on two GPUs of one host (benchmarks/NOTES.md, "Multi-GPU
# scaling"; the method is in benchmarks/scaling.py): DP=2 on the Falcon-H1-0.5B preset, TP=2 on
# the 34B layer shape cut to a few layers, strong (same model) and weak (twice the layers).
# Prints one table; $OUT gets scaling.json, scaling.txt, suite.log, device.txt and
# scaling_runs.tar.gz (every run's recipe, config.yaml, metrics.jsonl and log).
#   device run (kind nvidia-h200-x2): bash benchmarks/scaling_suite.sh     (carry: wheels)
# Measured on 2 x H200 (2026-11-26): dp1 134 s, dp2 50 s, tp1 149 s (34B-shape weights initialised
# on the host): the five cases do not fit one 10-minute device command. Run them as two calls:
#   SCALING_CASES=dp1,dp2 bash benchmarks/scaling_suite.sh
#   SCALING_CASES=tp1,tp2,tp2_weak bash benchmarks/scaling_suite.sh
# Env: SCALING_CUDA_GRAPH=1  also pass train.cuda_graph=true to every run
#      SCALING_CASES         comma list among dp1,dp2,tp1,tp2,tp2_weak (default: all, in that order)
#      SCALING_STEPS (12), SCALING_WARMUP (4: logged steps left out of the median)
#      SCALING_TP_LAYERS     layers of the TP=1/TP=2 model (4 on >= 120 GiB cards, else 2)
#      SCALING_DEADLINE_S    budget of all runs together (500; a device command may run 600 s)
#      SCALING_ARGS          more benchmarks/scaling.py flags, e.g. "--override train.recompute=selective"
set -uo pipefail
OUT=${OUT:-/tmp/falcon-scaling-out}
WORK=${SCALING_WORK:-/tmp/falcon-scaling}
source benchmarks/device_setup.sh
{ nvidia-smi topo -m; python3 -c "import torch; print('nccl', torch.cuda.nccl.version())"; } 2>&1 \
  | tee -a "$OUT/device.txt"
GPUS=$(nvidia-smi -L | wc -l)
if [ "$GPUS" -lt 2 ]; then
  echo "scaling_suite: needs 2 GPUs, this machine has $GPUS" | tee -a "$OUT/device.txt"
  exit 2
fi
MEM_MIB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | sort -n | head -1)
TP_ARGS=(--tp-layers "${SCALING_TP_LAYERS:-4}")
if [ "$MEM_MIB" -lt 122880 ]; then
  # An 80 GB card: the 34B's 261k-token embedding and LM head alone take ~45 GiB of bf16 weights,
  # fp32 grads and Adam states at TP=1. Same layer shape, 2 layers, a 131k vocabulary (NOTES.md).
  TP_ARGS=(--tp-layers "${SCALING_TP_LAYERS:-2}" --tp-override model.vocab_size=131072)
fi
EXTRA=()
[ "${SCALING_CUDA_GRAPH:-0}" = 1 ] && EXTRA+=(--cuda-graph)
[ -n "${SCALING_CASES:-}" ] && EXTRA+=(--cases "$SCALING_CASES")
# shellcheck disable=SC2086  # SCALING_ARGS is a list of flags
python3 benchmarks/scaling.py run --work "$WORK" --out "$OUT" --gpus 2 --precision bf16 \
  --steps "${SCALING_STEPS:-12}" --warmup "${SCALING_WARMUP:-4}" \
  --run-timeout-s 300 --deadline-s "${SCALING_DEADLINE_S:-500}" \
  "${TP_ARGS[@]}" "${EXTRA[@]}" ${SCALING_ARGS:-} 2>&1 | tee "$OUT/suite.log" | grep -v -i -E "warn|^\s*$"
status=${PIPESTATUS[0]}
# More files than come back from $OUT: the run dirs travel as one archive.
tar czf "$OUT/scaling_runs.tar.gz" -C "$WORK" . 2>&1 | tail -2
exit "$status"
