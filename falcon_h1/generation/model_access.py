"""Everything generation knows about the model's inside, in one module.

Generation runs the model's own forward for every token: embedding, layers, MLPs, norms,
LM head and the tensor-parallel gathers are the training code. Only the mixers change:

- prefill is the plain training forward, each mixer handing its branches' inputs (qkv and
  zxbcdt as its branches get them) and the rotary frequencies it was given to the cache code
  (falcon_h1.generation.cache), which computes that layer's states from them;
- a decode step is the forward on one token per row at its own position (position_ids), with
  each mixer swapped for a module that handles that token from the caches
  (falcon_h1.generation.decode): the mixer's own `branch_inputs` and `branch_outputs_combined`
  around cached branches that read its SSM parameters through the functions here; the model
  computes the rotary frequencies.

The µP scales are the mixer's: where it folds them into its weights (`mixer.scales_in_weights`),
the v rows carry attention_out_multiplier and the conv output of x carries ssm_out_multiplier
(`SsmParams.conv_out_scale`), so the cached quantities are those of the training forward.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch


@dataclass(frozen=True)
class SsmParams:
    """One Mamba-2 branch's parameters on this rank (local heads)."""

    conv_weight: torch.Tensor        # [conv_channels, d_conv]
    conv_bias: Optional[torch.Tensor]
    A: torch.Tensor                  # [heads] fp32, negative
    D: torch.Tensor                  # [heads]
    dt_bias: torch.Tensor            # [heads]
    dt_limit: tuple[float, float]
    conv_out_scale: Optional[torch.Tensor]  # [conv_channels] where the mixer folds its scales, else None
    heads: int
    head_dim: int
    groups: int
    d_state: int
    d_ssm: int                       # local z (= x) width
    bc: int                          # local width of B (and of C)


def check_can_generate(model) -> None:
    """Refuse model layouts a decode step cannot run, naming the setting."""
    from megatron.core import parallel_state

    pp = parallel_state.get_pipeline_model_parallel_world_size()
    if pp > 1:
        raise ValueError(f"generation with parallel.pp = {pp} is not supported; allowed: pp = 1 "
                         "(load the checkpoint at pp = 1: checkpoints load at any pipeline size).")
    if model.config.sequence_parallel:
        raise ValueError("generation with parallel.sequence_parallel = true is not supported (a decode step "
                         "has one token per row, which cannot be split over ranks); allowed: build the model "
                         "with sequence_parallel = false.")


def mixers(model) -> Iterator[tuple[int, torch.nn.Module]]:
    """(layer index, mixer) of every layer that has an attention and/or Mamba-2 mixer."""
    for index, layer in enumerate(model.layers):
        if layer.kind != "mlp":
            yield index, layer.mixer


def has_attention(mixer) -> bool:
    return mixer.attention


def has_mamba(mixer) -> bool:
    return mixer.mamba


def rotated_qkv(mixer, qkv: torch.Tensor, freqs: torch.Tensor):
    """qkv [s, b, .] -> q [s, b, q_heads, d], k and v [s, b, kv_heads, d], q and k rotated as the
    mixer rotates them (its kernel, freqs the model's [s, b or 1, 1, d])."""
    from falcon_h1 import kernels, rope

    d = mixer.dims
    return kernels.rotary_qkv(qkv, freqs, d.q, d.kv, mixer.cfg.kv_channels, rope.attention_scaling(mixer.cfg),
                              mixer.kernel_options.triton_rotary)


def attention_scale(mixer) -> float:
    return mixer.cfg.kv_channels ** -0.5


def split_zxbcdt(mixer, zxbcdt: torch.Tensor):
    """zxbcdt [..., .] -> z [..., d_ssm], xBC [..., conv_channels], dt [..., heads]."""
    d = mixer.dims
    return zxbcdt.split([d.z, d.conv_channels, d.dt], dim=-1)


def ssm_params(mixer) -> SsmParams:
    d, c = mixer.dims, mixer.cfg
    return SsmParams(
        conv_weight=mixer.conv1d_weight, conv_bias=mixer.conv1d_bias, A=-torch.exp(mixer.A_log.float()),
        D=mixer.D, dt_bias=mixer.dt_bias, dt_limit=tuple(c.time_step_limit),
        conv_out_scale=mixer.conv_out_scale if mixer.scales_in_weights else None, heads=d.ssm_heads,
        head_dim=c.ssm_head_dim, groups=d.groups, d_state=c.mamba_d_state, d_ssm=d.z, bc=d.bc)


def gate(mixer, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """The SSM output gated by z as the mixer does: gated RMSNorm, or y * silu(z)."""
    return mixer.gated_output(y, z)


def uses_gpu_kernels(mixer) -> bool:
    """Whether the mixer runs the GPU (Triton) SSM kernels: the model's choice, made when it was
    built for its device and kernel_backend."""
    return mixer.kernel_options.triton_ssd


@contextlib.contextmanager
def branch_inputs_seen_by(model, on_attention: Callable, on_mamba: Callable):
    """During the block each mixer's forward hands its branches' inputs (`branch_inputs`)
    to on_attention(layer index, mixer, qkv [s, b, .], rotary freqs) and on_mamba(layer index,
    mixer, zxbcdt [s, b, .]) before running the branch, so a prefill reads them instead of
    projecting the prompt a second time (used at once: no layer's projection outlives its own
    forward)."""
    wrapped = []
    for index, mixer in mixers(model):
        attention, mamba = mixer._attention, mixer._mamba

        def seen_attention(qkv, rotary_freqs, documents, index=index, mixer=mixer, run=attention, **options):
            on_attention(index, mixer, qkv, rotary_freqs)
            return run(qkv, rotary_freqs, documents, **options)

        def seen_mamba(zxbcdt, seq_idx, index=index, mixer=mixer, run=mamba, **options):
            on_mamba(index, mixer, zxbcdt)
            return run(zxbcdt, seq_idx, **options)

        # instance attributes shadow the branch methods for this block only
        mixer._attention, mixer._mamba = seen_attention, seen_mamba
        wrapped.append(mixer)
    try:
        yield
    finally:
        for mixer in wrapped:
            del mixer._attention, mixer._mamba


@contextlib.contextmanager
def mixers_replaced(model, make: Callable[[int, torch.nn.Module], torch.nn.Module]):
    """During the block each layer's mixer is make(layer index, mixer); restored afterwards.
    The stand-in is called as the mixer is: stand_in(u [s, b, H], rotary_freqs)."""
    originals = dict(mixers(model))
    try:
        for index, mixer in originals.items():
            model.layers[index].mixer = make(index, mixer)
        yield
    finally:
        for index, mixer in originals.items():
            model.layers[index].mixer = mixer


@contextlib.contextmanager
def last_position_logits(model):
    """During the block the model's forward returns logits of the last position only,
    [b, 1, V] (the LM head sees only the last hidden state: a prompt's full logits would
    be [b, L, V])."""
    def keep_last(module, args, kwargs):
        return (args[0][-1:], *args[1:]), kwargs

    handle = model.output_layer.register_forward_pre_hook(keep_last, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
