"""kernels.mamba_branch (the GPU path's Mamba branch as one autograd function) on CPU: its
Triton kernels (mamba_ssm's SSD and the conv) run through Triton's interpreter in a subprocess
and must match the pure-PyTorch reference path in float64, forward and every gradient; on packed
rows (seq_idx), the fused branch and the unfused Triton path equal every document run alone."""

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import run_in_triton_interpreter


def test_fused_mamba_branch_matches_reference_path_in_interpreter():
    pytest.importorskip("einops")
    if subprocess.run([sys.executable, "-c", "import importlib.util, sys; "
                       "sys.exit(importlib.util.find_spec('mamba_ssm') is None)"]).returncode:
        pytest.skip("mamba_ssm is not installed (./setup.sh installs it)")
    run_in_triton_interpreter(Path(__file__).with_name("mamba_branch_interpret_worker.py"), timeout=300)
