"""mamba_ssm's Triton kernels on CPU under Triton's interpreter (TRITON_INTERPRET=1).

Its launchers assume a GPU in three places, which are answered for the CPU here: they enter
`torch.cuda.device(index)`, read the SM count, and autotune over several configurations (timing
needs a GPU driver); each kernel keeps its first configuration. Call before the kernels run."""

import contextlib
import importlib
import os
import pkgutil
import types

import torch


def run_mamba_ssm_in_interpreter() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    torch.cuda.device = lambda index: contextlib.nullcontext()
    torch.cuda.get_device_properties = lambda *args: types.SimpleNamespace(multi_processor_count=132)
    from triton.runtime.autotuner import Autotuner

    from falcon_h1.kernels.mamba_branch import _ssd_functions

    _ssd_functions()
    import mamba_ssm.ops.triton as mamba_triton

    for info in pkgutil.iter_modules(mamba_triton.__path__):
        for value in vars(importlib.import_module(f"mamba_ssm.ops.triton.{info.name}")).values():
            if isinstance(value, Autotuner):
                value.configs = value.configs[:1]
