#!/usr/bin/env bash
# Sets up .venv with everything the project needs (idempotent; safe to rerun).
#   ./setup.sh          CPU/GPU training, tests (--gpu is accepted and changes nothing: mamba-ssm's
#                       Triton SSD kernels are installed everywhere; the CPU tests interpret them)
set -euo pipefail
cd "$(dirname "$0")"

find_python() {
  for candidate in "${PYTHON:-}" python3.12 python3.13 "$HOME"/.pyenv/versions/3.12*/bin/python3.12 \
      "$HOME"/.pyenv/versions/3.13*/bin/python3.13 /root/.pyenv/versions/3.12*/bin/python3.12 \
      /usr/bin/python3.12 /usr/local/bin/python3.12; do
    [ -n "$candidate" ] || continue
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
      command -v "$candidate"; return 0
    fi
  done
  return 1
}

if [ ! -x .venv/bin/python ]; then
  if ! PY=$(find_python); then
    echo "setup.sh: no Python >= 3.12 found (megatron-core >= 0.17 needs it). Looked at \$PYTHON, python3.12," \
         "python3.13 on PATH and pyenv's versions folder (~/.pyenv/versions/3.12*). Install one (e.g." \
         "'pyenv install 3.12') or point PYTHON at it: PYTHON=/path/to/python3.12 ./setup.sh" >&2
    exit 1
  fi
  echo "setup.sh: creating .venv with $PY"
  "$PY" -m venv .venv
fi

stamp=.venv/.setup-stamp
want=$(cat pyproject.toml setup.sh | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[test]"
  # mamba-ssm's PyPI release is an sdist whose setup downloads a CUDA wheel; built without its CUDA
  # extension (the Triton SSD kernels need none), against the torch just installed.
  MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE .venv/bin/python -m pip install -q \
    --no-build-isolation --no-deps mamba-ssm==2.3.2.post1
  echo "$want" > "$stamp"
fi
