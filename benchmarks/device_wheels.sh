#!/usr/bin/env bash
# Fill wheels/ with what device calls install on the GPU machine (it has torch, Triton and
# transformers, and no internet): megatron-core, omegaconf, hydra-core and antlr4 for Python 3.12,
# mamba-ssm built without its CUDA extension (the Triton SSD kernels need none), and causal_conv1d's
# sdist for benchmarks/build_causal_conv1d_here.sh. Needs ./setup.sh's .venv.
#   usage: bash benchmarks/device_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
[ -x "$py" ] || { echo "device_wheels.sh: run ./setup.sh first (it makes .venv)" >&2; exit 1; }
mkdir -p wheels
"$py" -m pip download -q --no-deps --only-binary=:all: --platform manylinux_2_28_x86_64 --python-version 3.12 \
  -d wheels megatron-core==0.19.2 omegaconf==2.3.0 hydra-core==1.3.2
"$py" -m pip wheel -q --no-deps -w wheels antlr4-python3-runtime==4.9.3
MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE "$py" -m pip wheel -q --no-build-isolation --no-deps -w wheels \
  mamba-ssm==2.3.2.post1
if [ ! -f wheels/causal_conv1d-1.7.0.tar.gz ]; then  # pip download would build it; fetch the sdist itself
  url=$(curl -fsS -H "Accept: application/vnd.pypi.simple.v1+json" https://pypi.org/simple/causal-conv1d/ | "$py" -c \
    "import json, sys; print(next(f['url'] for f in json.load(sys.stdin)['files'] if f['filename'] == 'causal_conv1d-1.7.0.tar.gz'))")
  curl -fsSL -o wheels/causal_conv1d-1.7.0.tar.gz "$url"
fi
ls -la wheels/
