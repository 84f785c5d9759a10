#!/usr/bin/env bash
# Build causal_conv1d 1.7.0's CUDA extension for Hopper (sm_90 only) on the GPU machine, so the
# Hugging Face FalconH1 baseline in falcon-bench runs its fast path (mamba_ssm's fused
# split-conv1d-scan needs it). The sdist has no wheel for torch 2.11 / CUDA 13 and its setup.py
# builds eight architectures; one is enough here (platform.md: ~434 s on 16 cores).
#   usage: bash benchmarks/build_causal_conv1d.sh SDIST OUT_DIR     (writes OUT_DIR/*.whl)
set -euo pipefail
sdist=$1 out=$2
work=$(mktemp -d)
tar xzf "$sdist" -C "$work"
src=$(echo "$work"/causal_conv1d-*)
python3 - "$src/setup.py" <<'PY'
import re, sys
path = sys.argv[1]
text = open(path).read()
# drop every '-gencode arch=...' pair, then add sm_90 alone
text = re.sub(r'\s*cc_flag\.append\("-gencode"\)\n\s*cc_flag\.append\("arch=compute_\d+,code=sm_\d+"\)', "", text)
text = re.sub(r'\n\s*if bare_metal_version >= Version\("[\d.]+"\):(?=\n\s*\n|\n\s*if )', "", text)
text = re.sub(r'\n\s*if bare_metal_version >= Version\("[\d.]+"\):(?=\n\s*\n)', "", text)
compile(text, path, "exec")
marker = "    # HACK: The compiler flag -D_GLIBCXX_USE_CXX11_ABI"
assert marker in text
text = text.replace(marker, '    cc_flag += ["-gencode", "arch=compute_90,code=sm_90"]\n\n' + marker, 1)
open(path, "w").write(text)
PY
grep -n "compute_" "$src/setup.py"
export CAUSAL_CONV1D_FORCE_BUILD=TRUE MAX_JOBS=${MAX_JOBS:-16}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
mkdir -p "$out"
(cd "$src" && python3 -m pip wheel --no-build-isolation --no-deps -w "$out" . )
ls -la "$out"
