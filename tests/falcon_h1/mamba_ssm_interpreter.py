"""mamba_ssm's Triton kernels on CPU through Triton's interpreter (TRITON_INTERPRET=1, set before
triton is imported). Its launchers assume a GPU in three places, answered for the CPU here: they
enter `torch.cuda.device(index)`, read the SM count, and autotune over several configurations
(timing needs a GPU driver); each kernel keeps its first configuration."""

import contextlib
import importlib
import os
import pkgutil
import types

import torch


def prepare() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    torch.cuda.device = lambda index: contextlib.nullcontext()
    torch.cuda.get_device_properties = lambda *args: types.SimpleNamespace(multi_processor_count=132)
    from triton.runtime.autotuner import Autotuner

    from falcon_h1.kernels.ssd_triton import make_mamba_ssm_importable

    make_mamba_ssm_importable()
    import mamba_ssm.ops.triton as mamba_triton

    for info in pkgutil.iter_modules(mamba_triton.__path__):
        for value in vars(importlib.import_module(f"mamba_ssm.ops.triton.{info.name}")).values():
            if isinstance(value, Autotuner):
                value.configs = value.configs[:1]
