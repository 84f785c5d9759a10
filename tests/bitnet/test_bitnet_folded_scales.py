"""µP multipliers folded into BitNet projections (falcon_h1.linears.project_row_scaled through
BitNet's output_row_scale) compute the model with the multipliers on the activations: on the
reference path here, on the Triton kernels in Triton's interpreter (a subprocess)."""

from pathlib import Path

import pytest

from falcon_h1.kernels import KernelOptions
from recipes.config import BitNetConfig
from tests.bitnet.folded_scales import CONFIG, EVERY_LAYER, TOLERANCE, batch, bitnet_model, folding, run
from tests.falcon_h1.packed_model import errors


def _bitnet_model(bitnet_cfg, fold: bool, fused_projections: bool):
    return bitnet_model(bitnet_cfg, KernelOptions(fold_scales=fold), fused_projections)


@pytest.mark.parametrize("bitnet", [
    dict(),                                           # fused float GEMM, int8 input kept
    dict(int8_matmul=True),                           # int8 GEMM: the scale in its per-row epilogue
    dict(fused=False),                                # the reference straight-through pattern
    dict(subln=True),                                 # RMSNorm (with its epsilon) before each quantiser
    dict(layers=["mamba_in", "mamba_out", "mlp"]),    # qkv rows full precision in a quantised in_proj
], ids=["float_gemm", "int8_gemm", "reference_ste", "subln", "mixed_segments"])
@pytest.mark.parametrize("fused_projections", [True, False], ids=["fused", "unfused"])
def test_folded_scales_compute_the_unfolded_bitnet_model(megatron_single, bitnet, fused_projections):
    """Logits, loss and every gradient as with the multipliers on the activations (bit for bit
    here, with power-of-two multipliers; see tests/bitnet/folded_scales.py). SubLN included: the
    out-projections (row linears) are handed the same input either way, so their quantisers and
    SubLN's epsilon see the same values."""
    bitnet_cfg = BitNetConfig(enabled=True, **{"layers": EVERY_LAYER, **bitnet})
    folded = _bitnet_model(bitnet_cfg, fold=True, fused_projections=fused_projections)
    unfolded = _bitnet_model(bitnet_cfg, fold=False, fused_projections=fused_projections)
    assert folding(folded) == {True} and folding(unfolded) == {False}
    data = batch(CONFIG.vocab_size)
    got = errors(run(folded, data), run(unfolded, data))
    worst = max(got, key=got.get)
    assert got[worst] <= TOLERANCE, (worst, got[worst], got)


def test_folded_scales_compute_the_unfolded_bitnet_model_with_the_gated_norm(megatron_single):
    """The released presets' gated RMSNorm (the gate first): folded, ssm_out_multiplier rides on
    the norm's output instead of on x (which the norm would normalise away); bit for bit the model
    with the multipliers on the activations."""
    bitnet_cfg = BitNetConfig(enabled=True, layers=EVERY_LAYER)
    folded, unfolded = (bitnet_model(bitnet_cfg, KernelOptions(fold_scales=fold), True, mamba_rms_norm=True)
                        for fold in (True, False))
    assert folding(folded) == {True} and folding(unfolded) == {False}
    assert all(layer.mixer.norm_out_scale == CONFIG.ssm_out_multiplier for layer in folded.layers)
    data = batch(CONFIG.vocab_size)
    got = errors(run(folded, data), run(unfolded, data))
    worst = max(got, key=got.get)
    assert got[worst] <= TOLERANCE, (worst, got[worst], got)


def test_folded_bitnet_projections_are_handed_their_row_scale(megatron_single):
    """The folded model hands BitNet's column linears the constant row-scale buffers (never a
    scaled weight, which would quantise differently), and their quantised weight is still made
    once and reused by later forwards and the backward (the weight cache keys on the buffer)."""
    model = _bitnet_model(BitNetConfig(enabled=True, layers=EVERY_LAYER), fold=True, fused_projections=True)
    handed, made = {}, {}
    for layer in model.layers:
        for linear in (layer.mixer.in_proj, layer.mlp.linear_fc1):
            forward, make = linear.forward, linear._make_gemm_weight

            def spy(u, weight=None, output_row_scale=None, forward=forward, linear=linear):
                handed.setdefault(linear, []).append((weight, output_row_scale))
                return forward(u, weight, output_row_scale=output_row_scale)

            def counted(weight, row_scale, make=make, linear=linear):
                made[linear] = made.get(linear, 0) + 1
                return make(weight, row_scale)

            linear.forward, linear._make_gemm_weight = spy, counted
    data = batch(CONFIG.vocab_size)
    for _ in range(2):
        model(data["ids"], labels=data["labels"]).sum().backward()
    for layer in model.layers:
        for linear, scale in ((layer.mixer.in_proj, layer.mixer.in_proj_row_scale),
                              (layer.mlp.linear_fc1, layer.mlp.fc1_row_scale)):
            assert len(handed[linear]) == 2 and not scale.requires_grad
            assert all(weight is None and given is scale for weight, given in handed[linear])
            assert made[linear] == 1


@pytest.mark.slow  # 25-45 s on two CPU cores (the interpreter runs every kernel instance in Python)
def test_folded_bitnet_model_on_triton_kernels_in_interpreter():
    """The same comparison on the GPU path's kernels (BitNet's Triton quantisers and GEMM, the
    Triton SwiGLU the folded MLP now takes, conv, scan) on CPU through Triton's interpreter."""
    from tests.conftest import run_in_triton_interpreter

    run_in_triton_interpreter(Path(__file__).with_name("folded_scales_interpret_worker.py"), timeout=600)
