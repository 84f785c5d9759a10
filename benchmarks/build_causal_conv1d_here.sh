#!/usr/bin/env bash
# Build causal_conv1d's wheel for the GPU machine on this one (no GPU needed, no device time): a side
# venv with the device's torch (2.11.0, CUDA 13, from PyPI: ~4.7 GB), this machine's nvcc 13, sm_90 only
# (benchmarks/build_causal_conv1d.sh). Seen here: 7.5 min on 2 cores. The wheel goes to .whl/, which
# device calls carry for the Hugging Face fast path (benchmarks/call_streaming_conv.sh, call_hf_ratios.sh).
#   usage: bash benchmarks/build_causal_conv1d_here.sh      (env: VENV, PYTHON, CUDA_HOME, SDIST)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VENV:-/tmp/cc1d_venv}
sdist=${SDIST:-wheels/causal_conv1d-1.7.0.tar.gz}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
[ -x "$CUDA_HOME/bin/nvcc" ] || { echo "build_causal_conv1d_here.sh: no nvcc at $CUDA_HOME/bin/nvcc; set CUDA_HOME" >&2; exit 1; }
[ -f "$sdist" ] || { echo "build_causal_conv1d_here.sh: no sdist at $sdist (PyPI's causal_conv1d-1.7.0.tar.gz); set SDIST" >&2; exit 1; }
if [ ! -x "$venv/bin/python" ]; then
  py=${PYTHON:-$(ls "$HOME"/.pyenv/versions/3.12*/bin/python3.12 2>/dev/null | head -1)}
  [ -n "$py" ] || { echo "build_causal_conv1d_here.sh: no Python 3.12 (the device's); set PYTHON" >&2; exit 1; }
  "$py" -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q torch==2.11.0 numpy packaging ninja setuptools wheel
out=$(mktemp -d)
PATH="$venv/bin:$PATH" MAX_JOBS=${MAX_JOBS:-2} bash benchmarks/build_causal_conv1d.sh "$sdist" "$out"
mkdir -p .whl && cp "$out"/causal_conv1d-*.whl .whl/
"$venv/bin/python" -m pip install -q --no-deps --force-reinstall .whl/causal_conv1d-*.whl
"$venv/bin/python" -c "import torch, causal_conv1d_cuda; print('causal_conv1d_cuda imports against torch', torch.__version__)"
ls -la .whl/
