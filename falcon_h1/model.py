"""Falcon-H1 language model on Megatron Core, and the one function that builds it."""

from __future__ import annotations

import math
from functools import partial
from typing import Optional

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.tensor_parallel import VocabParallelEmbedding
from megatron.core.enums import ModelType
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import sharded_state_dict_default

from falcon_h1 import kernels
from falcon_h1.megatron_compat.transformer import MEGATRON_FUSIONS_OFF, recompute
from falcon_h1.config import FalconH1Config, check_recompute_layers, resolve
from falcon_h1.context_parallel import ContextParallelLayout, check_model
from falcon_h1.kernels import KernelOptions
from falcon_h1.kernels.documents import packed_documents
from falcon_h1.layers import FalconH1Layer, RMSNorm
from falcon_h1.linears import MEGATRON_LINEARS, LinearSpec
from falcon_h1.rope import RotaryFrequencies
from falcon_h1.weights import accumulated_grad


def padded_vocab_size(vocab_size: int, tp: int, multiple: int = 64) -> int:
    """Vocabulary padded so every tensor-parallel rank holds an equal, aligned slice.

    The unit is at least 512 so TP sizes 1, 2, 4 and 8 pad alike and a checkpoint's
    embedding keeps its shape when it is loaded at another TP size.
    """
    unit = math.lcm(multiple * tp, 512)
    return -(-vocab_size // unit) * unit


def make_transformer_config(
    cfg: FalconH1Config, tp: int = 1, pp: int = 1, sequence_parallel: bool = False,
    params_dtype: torch.dtype = torch.float32, bf16: bool = False, recompute: str = "none", cp: int = 1,
    recompute_layers: Optional[int] = None,
) -> TransformerConfig:
    """Megatron's TransformerConfig for a Falcon-H1 config. CPU-safe fusions off without CUDA.
    recompute_layers (with recompute = "full"): only the first N layers of this pipeline stage
    are recomputed (Megatron's "block" method); None: every layer."""
    check_recompute_layers(recompute, recompute_layers, cfg.num_hidden_layers // pp)
    on_gpu = torch.cuda.is_available()
    return TransformerConfig(
        num_layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.intermediate_size,
        num_attention_heads=max(cfg.num_attention_heads, 1),
        num_query_groups=max(cfg.num_key_value_heads, 1),
        kv_channels=cfg.kv_channels,
        layernorm_epsilon=cfg.rms_norm_eps,
        normalization="RMSNorm",
        gated_linear_unit=True,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=cfg.initializer_range,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=cp,
        sequence_parallel=sequence_parallel and tp > 1,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype if pp > 1 else None,
        bf16=bf16,
        use_cpu_initialization=not on_gpu,
        perform_initialization=False,  # weights come from falcon_h1.weights (TP-invariant init)
        **MEGATRON_FUSIONS_OFF,
        persist_layer_norm=False,
        recompute_granularity=None if recompute == "none" else recompute,
        recompute_method=(None if recompute != "full" else "uniform" if recompute_layers is None else "block"),
        recompute_num_layers=(None if recompute != "full" else 1 if recompute_layers is None else recompute_layers),
    )


class FalconH1Model(MegatronModule):
    """Embedding -> Falcon-H1 layers -> final norm -> LM head (µP multipliers as config).

    forward(input_ids) -> logits [batch, seq, vocab] (gathered over TP, vocab padding
    removed); forward(input_ids, labels=...) -> per-token loss [batch, seq] computed
    on the vocab-parallel logits without gathering them, multiplied by `loss_mask`
    [batch, seq] when given (not averaged: the caller reduces). `position_ids` [batch, seq]
    are the RoPE positions of the tokens (default 0..seq-1 for every row); as in Hugging Face's
    packed-sequence convention every position 0 after a row's first token starts a new
    document there, which no SSM state, conv window or attention crosses
    (kernels.documents). Rows without such a restart run the unpacked kernels.

    linears: the projections' classes; kernel_options: the kernels' choices, as resolved for
    the device the model runs on (KernelOptions.for_device). build_model makes both.
    """

    def __init__(self, cfg: FalconH1Config, config: TransformerConfig, linears: LinearSpec,
                 kernel_options: KernelOptions, pre_process: bool = True, post_process: bool = True,
                 context_parallel: Optional[ContextParallelLayout] = None):
        super().__init__(config)
        self.cfg = cfg
        self.kernel_options = kernel_options
        # with context parallelism the inputs, positions and outputs are this rank's chunks of
        # each sequence (falcon_h1.context_parallel)
        self.context_parallel = context_parallel
        # the dtype of the Hugging Face checkpoint the weights came from (falcon_h1.hf sets it;
        # to_hf writes that dtype back by default); None for a model not loaded from one
        self.hf_dtype: Optional[torch.dtype] = None
        self.model_type = ModelType.encoder_or_decoder  # what Megatron's schedules ask for
        self.pre_process, self.post_process = pre_process, post_process
        tp = parallel_state.get_tensor_model_parallel_world_size()
        self.vocab_padded = padded_vocab_size(cfg.vocab_size, tp)
        self.share_embeddings_and_output_weights = cfg.tie_word_embeddings
        if cfg.tie_word_embeddings and parallel_state.get_pipeline_model_parallel_world_size() > 1:
            raise ValueError("model.tie_word_embeddings = true is not supported with parallel.pp > 1; "
                             "allowed: untied embeddings (the released Falcon-H1 models are untied) or pp = 1.")
        if pre_process:
            self.embedding = VocabParallelEmbedding(
                self.vocab_padded, cfg.hidden_size, init_method=config.init_method, config=config)
        kinds = cfg.layer_kinds
        first, last = self._layer_range(len(kinds))
        self.layer_offset = first
        self.layers = torch.nn.ModuleList(
            FalconH1Layer(cfg, config, kinds[i], linears, kernel_options, context_parallel)
            for i in range(first, last))
        if cfg.has_attention:
            self.rotary = RotaryFrequencies(cfg)
        if post_process:
            self.final_layernorm = RMSNorm(config, cfg.hidden_size, cfg.rms_norm_eps, kernel_options)
            self.output_layer = linears.linear("lm_head", "column")(
                cfg.hidden_size, self.vocab_padded, config=config, init_method=config.init_method,
                bias=False, gather_output=False, skip_bias_add=True,
                skip_weight_param_allocation=pre_process and cfg.tie_word_embeddings)
        self.input_tensor: Optional[torch.Tensor] = None

    def _recomputed_layers(self) -> int:
        """How many of this stage's first layers the backward recomputes (full recomputation)."""
        c = self.config
        if c.recompute_granularity != "full" or not self.training:
            return 0
        return c.recompute_num_layers if c.recompute_method == "block" else len(self.layers)

    @staticmethod
    def _layer_range(n_layers: int) -> tuple[int, int]:
        pp = parallel_state.get_pipeline_model_parallel_world_size()
        rank = parallel_state.get_pipeline_model_parallel_rank()
        if n_layers % pp:
            raise ValueError(f"model.num_hidden_layers = {n_layers} must be divisible by parallel.pp = {pp}.")
        per = n_layers // pp
        return rank * per, (rank + 1) * per

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """Checkpoint keys with global layer numbers (any PP split loads them), each layer's
        submodules sharded by their own rules (see ParallelHybridMixer.sharded_state_dict)."""
        sd = {}
        for name, module in self.named_children():
            if name == "layers":
                for j, layer in enumerate(self.layers):
                    sd.update(layer.sharded_state_dict(
                        f"{prefix}layers.{j + self.layer_offset}.", sharded_offsets, metadata))
            else:
                sd.update(sharded_state_dict_default(module, f"{prefix}{name}.", sharded_offsets, metadata))
        return sd

    def set_input_tensor(self, input_tensor):
        """Pipeline parallelism hands the previous stage's activations in here."""
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        self.input_tensor = input_tensor

    def shared_embedding_or_output_weight(self):
        return self.embedding.weight if self.pre_process else self.output_layer.weight

    def forward(self, input_ids, position_ids=None, labels=None, loss_mask=None):
        cfg = self.cfg
        if self.pre_process:
            h = self.embedding(input_ids) * cfg.embedding_multiplier   # [b, s, H]
            h = h.transpose(0, 1).contiguous()                         # [s, b, H]
            if self.config.sequence_parallel:
                h = tensor_parallel.scatter_to_sequence_parallel_region(h)
        else:
            h = self.input_tensor
        seq_len = input_ids.shape[1]
        if position_ids is None and self.context_parallel is not None:
            position_ids = self.context_parallel.positions(seq_len, input_ids.device)[None]  # global positions
        rotary = self.rotary(seq_len, position_ids, input_ids.device) if cfg.has_attention else None
        documents = packed_documents(position_ids, input_ids.shape[0])  # once per batch, for every layer
        if documents is not None and self.context_parallel is not None:
            raise ValueError("position_ids restart inside a row (packed documents), which context parallelism "
                             "does not split by document; allowed: parallel.cp = 1 for packed rows, or rows "
                             "without restarting positions.")
        recomputed = self._recomputed_layers()
        pending = None  # the last layer's MLP output, which the next norm adds (FalconH1Layer.forward)
        for index, layer in enumerate(self.layers):
            # documents ride in the function: Megatron's checkpoint saves tensor arguments only
            run = layer if documents is None else partial(layer, documents=documents)
            if index < recomputed:  # the recomputation saves the layer's input alone: the whole stream
                h = recompute(run, h if pending is None else h + pending, rotary)
                pending = None
            else:
                h, pending = run(h, rotary, pending=pending, defer_mlp_add=True)
                if not self.kernel_options.residual_across_layers:
                    h, pending = h + pending, None
        if not self.post_process:
            return h if pending is None else h + pending
        normed = self.final_layernorm(h) if pending is None else self.final_layernorm.add_and_norm(h, pending)[1]
        h = normed * cfg.lm_head_multiplier
        weight = self.embedding.weight if cfg.tie_word_embeddings else None
        logits, _ = self.output_layer(h, weight=weight)                # [s, b, V/tp]
        if labels is None:
            logits = kernels.mask_vocab_padding(logits, cfg.vocab_size)
            logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
            return logits[..., : cfg.vocab_size].transpose(0, 1).contiguous()
        # the fast path masks the padding itself and overwrites the logits with their gradient
        loss = kernels.vocab_parallel_cross_entropy(logits, labels.transpose(0, 1).contiguous(), cfg.vocab_size,
                                                    self.kernel_options.fused_cross_entropy)
        loss = loss.transpose(0, 1).contiguous()                      # [b, s]
        return loss if loss_mask is None else loss * loss_mask


def build_model(
    cfg: FalconH1Config, *, linears: LinearSpec = MEGATRON_LINEARS, kernel_options: KernelOptions = KernelOptions(),
    sequence_parallel: bool = False, precision: str = "fp32", recompute: str = "none", seed: int = 1234,
    initialize: bool = True, device: Optional[torch.device] = None,
    context_parallel: Optional[ContextParallelLayout] = None, recompute_layers: Optional[int] = None,
) -> FalconH1Model:
    """The one place a Falcon-H1 config becomes a Megatron model on this rank.

    Needs Megatron's parallel state (falcon_h1.megatron_compat.parallel.initialize_parallel). Weights
    are initialised from `seed` in the Hugging Face layout and sliced per rank, so
    any TP size starts from the same model. `linears` gives the projections' classes
    (bitnet.spec makes BitNet's). The kernels are chosen here, once, for `device` (default:
    this process's GPU, else the CPU): build the model on the device it runs on.
    `context_parallel`: which chunks of each sequence this model sees (default: this rank's
    under Megatron's context-parallel group, none at cp = 1; `ContextParallelLayout.emulated(cp)`
    runs all ranks in one process).
    """
    from falcon_h1.megatron_compat.parallel import default_device
    from falcon_h1.weights import init_weights

    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    cfg = resolve(cfg, tp)
    layout = context_parallel if context_parallel is not None else ContextParallelLayout.current()
    if layout is not None:
        check_model(cfg, layout.cp)
    device = torch.device(device) if device is not None else default_device()
    bf16 = precision == "bf16"
    config = make_transformer_config(cfg, tp, pp, sequence_parallel, torch.bfloat16 if bf16 else torch.float32,
                                     bf16, recompute, cp=parallel_state.get_context_parallel_world_size(),
                                     recompute_layers=recompute_layers)
    model = FalconH1Model(
        cfg, config, linears, kernel_options.with_model_choices(cfg.ssd_kernels, cfg.mamba_keep_conv_output).for_device(cfg.kernel_backend, device),
        pre_process=parallel_state.is_pipeline_first_stage(), post_process=parallel_state.is_pipeline_last_stage(),
        context_parallel=layout)
    model.to(device)
    linears.finish(model)
    if initialize:
        init_weights(model, seed)
    return model


def allreduce_sequence_parallel_grads(model: torch.nn.Module) -> None:
    """Sum the grads of TP-replicated params that only saw a sequence shard (norm weights
    under sequence parallelism) over the TP group, as Megatron's finalize_model_grads does."""
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return
    group = parallel_state.get_tensor_model_parallel_group()
    for p in model.parameters():
        if getattr(p, "sequence_parallel", False):
            grad = accumulated_grad(p)
            if grad is not None:
                torch.distributed.all_reduce(grad, group=group)
