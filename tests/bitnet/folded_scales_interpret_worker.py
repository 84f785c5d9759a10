"""tests/bitnet/folded_scales.py on the GPU path's kernels, run on CPU by Triton's interpreter
(TRITON_INTERPRET=1, set by test_bitnet_folded_scales.py), fp32: the BitNet quantisers' Triton
kernels (the float GEMM; the int8 one is autotuned, which needs a GPU), the Triton SwiGLU that
the folded MLP takes, the fused Mamba branch with the conv output scale, the Triton cross
entropy. Exit 1 on failure."""

import sys
import types

from tests.falcon_h1.interpreter_stand_ins import run_mamba_ssm_in_interpreter

run_mamba_ssm_in_interpreter()

from bitnet import kernels as bitnet_kernels  # noqa: E402
from bitnet import triton_kernels  # noqa: E402
from falcon_h1.kernels import KernelOptions  # noqa: E402
from falcon_h1.megatron_compat.parallel import initialize_parallel  # noqa: E402
from recipes.config import BitNetConfig  # noqa: E402
from tests.bitnet.folded_scales import CONFIG, EVERY_LAYER, TOLERANCE, batch, bitnet_model, folding, run  # noqa: E402
from tests.falcon_h1.packed_model import errors  # noqa: E402

# BitNet picks its Triton kernels for CUDA tensors only; here they take the CPU ones. The
# interpreter has no libdevice: its `/` is numpy's IEEE round-to-nearest division, as div_rn.
bitnet_kernels._uses_triton = lambda kernel_backend, t, fits_triton: kernel_backend != "reference"
triton_kernels.libdevice = types.SimpleNamespace(div_rn=lambda a, b: a / b)
# fused_rms_norm is torch's CUDA kernel and attention is not Triton: as on the CPU.
TRITON = KernelOptions(fused_rms_norm=False, packed_attention="sdpa")

initialize_parallel(tp=1)
bitnet_cfg = BitNetConfig(enabled=True, layers=EVERY_LAYER)
# fused projections (the default): the in-projection's row scale spans the qkv and zxbcdt segments
folded, unfolded = (bitnet_model(bitnet_cfg, KernelOptions(**{**vars(TRITON), "fold_scales": fold}),
                                 fused_projections=True, as_built_on_gpu=True) for fold in (True, False))
assert folding(folded) == {True} and folding(unfolded) == {False}
assert all(layer.mixer.fused_mamba_branch and layer.mlp.triton_swiglu for layer in folded.layers)
data = batch(CONFIG.vocab_size, b=1, s=21)
got = errors(run(folded, data), run(unfolded, data))
worst = max(got, key=got.get)
print(f"worst {worst} {got[worst]:.1e} (logits {got['logits']:.1e}, loss {got['loss']:.1e})")
sys.exit(0 if got[worst] <= TOLERANCE else 1)
