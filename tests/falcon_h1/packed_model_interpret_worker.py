"""The packed rows of tests/falcon_h1/packed_model.py through a model on the GPU path's kernels
(mamba_ssm's SSD scan, the Triton conv, the fused Mamba branch, RoPE, RMSNorm, SwiGLU, the fused
cross entropy), run on CPU by Triton's interpreter (TRITON_INTERPRET=1, set by test_packed_model.py), fp32:
per-token logits, loss and every gradient against every document run alone on the same kernels.
The Mamba branch is the fused one, as on a GPU (the conv and the gated scan as separate kernels
take the same seq_idx: tests/falcon_h1/mamba_branch_interpret_worker.py). Exit 1 on failure."""

import sys
from dataclasses import replace

import torch

from tests.falcon_h1.interpreter_stand_ins import run_mamba_ssm_in_interpreter

run_mamba_ssm_in_interpreter()

from falcon_h1.megatron_compat.parallel import initialize_parallel  # noqa: E402
from falcon_h1.config import resolve  # noqa: E402
from falcon_h1.kernels import KernelOptions  # noqa: E402
from falcon_h1.linears import MEGATRON_LINEARS  # noqa: E402
from falcon_h1.model import FalconH1Model, make_transformer_config  # noqa: E402
from falcon_h1.weights import init_weights  # noqa: E402
from tests.falcon_h1.packed_model import CONFIG, ROWS, TOLERANCE, batch, errors, run_alone, run_packed  # noqa: E402

# Every Triton kernel on, as on a GPU; build_model would turn them off on a CPU
# (KernelOptions.for_device), so the model is assembled here as build_model does otherwise.
# fused_rms_norm is torch's CUDA kernel, not a Triton one; attention is not Triton either
# (FlexAttention has no backward on CPU), so packed rows take SDPA with the document mask.
TRITON = KernelOptions(fused_rms_norm=False, packed_attention="sdpa", triton_out_projection_input=True,
                       rotary_one_launch=True, triton_row_scale=True)


def triton_model(options: KernelOptions, seed: int = 7, config=CONFIG) -> FalconH1Model:
    cfg = resolve(config)
    model = FalconH1Model(cfg, make_transformer_config(cfg), MEGATRON_LINEARS, options)
    MEGATRON_LINEARS.finish(model)
    init_weights(model, seed)
    return model


initialize_parallel(tp=1)
model = triton_model(TRITON)
assert all(layer.mixer.fused_mamba_branch for layer in model.layers), "the model did not take the fused branch"
assert all(layer.mixer.shares_in_projection_gradient for layer in model.layers), \
    "the fused branch did not write into the fused in-projection's gradient"
data = batch(ROWS, CONFIG.vocab_size)
packed = run_packed(model, data)
got = errors(packed, run_alone(model, data, ROWS))
worst = max(got, key=got.get)
print(f"worst {worst} {got[worst]:.1e} (logits {got['logits']:.1e}, loss {got['loss']:.1e})")
# the in-projection's gradient assembled in the fused branch's buffer holds the same values as the
# two branches' gradients concatenated
concatenated = run_packed(triton_model(replace(TRITON, shared_in_projection_gradient=False)), data)
differ = [name for name, grad in packed["grads"].items() if not torch.equal(grad, concatenated["grads"][name])]
print(f"gradients that differ from the concatenated in-projection gradient's: {differ}")
# RoPE and the RMSNorms (with the residual add before the MLP's) in their Triton kernels against
# the reference formulas op by op (fp32: rounding apart)
op_by_op = run_packed(triton_model(replace(TRITON, triton_rotary=False, triton_rms_norm=False)), data)
rope_errors = errors(packed, op_by_op)
rope_worst = max(rope_errors, key=rope_errors.get)
print(f"against RoPE and RMSNorm op by op: worst {rope_worst} {rope_errors[rope_worst]:.1e}")
# the gated RMSNorm presets (mamba_rms_norm, the gate first) take the fused branch too, its norm after
# it: against the same weights on the PyTorch reference path (another scan and conv: fp32 rounding
# reaches 8e-6 in the conv's B weights, as it does for the model without the norm)
CROSS_PATH_TOLERANCE = 5e-5
NORM_CONFIG = CONFIG.replace(mamba_rms_norm=True, mamba_norm_before_gate=False)
norm_model = triton_model(TRITON, config=NORM_CONFIG)
assert all(layer.mixer.fused_mamba_branch and layer.mixer.shares_in_projection_gradient
           for layer in norm_model.layers), "the gated RMSNorm model did not take the fused branch"
reference = triton_model(KernelOptions().for_device("reference", torch.device("cpu")), config=NORM_CONFIG)
norm_packed, norm_reference = run_packed(norm_model, data), run_packed(reference, data)
norm_errors = errors(norm_packed, norm_reference)
norm_worst = max(norm_errors, key=norm_errors.get)
print(f"gated RMSNorm model on the fused branch against the reference path: worst {norm_worst} "
      f"{norm_errors[norm_worst]:.1e}")
sys.exit(0 if got[worst] <= TOLERANCE and not differ and rope_errors[rope_worst] <= TOLERANCE
         and norm_errors[norm_worst] <= CROSS_PATH_TOLERANCE else 1)
