"""The typed configuration tree of a training run (the "recipe").

Every Hydra config group in `configs/` is backed by one dataclass here (the model's in
`falcon_h1.config`, the executor's in `launchers.config`), so a typo or a wrong type in an
override fails with the key named instead of silently creating a new field. The Python API
builds the same objects (see `recipes.falcon_h1_pretrain`).

Naming in recipes/: `*_cfg` is one of these (`model_cfg` a FalconH1Config, `train_cfg` a
TrainConfig, ...); `*_config` is Megatron's (`transformer_config`, `optimizer_config`,
`ddp_config`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from falcon_h1.config import FalconH1Config
from launchers.config import ExecutorConfig


@dataclass
class MupConfig:
    """Where the model's 14 µP multipliers (the `model.*_multiplier` keys, one key each) come from.

    mode: preset (the model preset's values) | derived (the width relations of falcon_h1/mup.py
    applied to the composed model's widths) | unit (all 1). Resolved when the recipe is composed
    (see recipes/hydra_presets.py); a multiplier set explicitly in `model.` wins in every mode.
    """

    mode: str = "preset"


@dataclass
class BitNetConfig:
    """BitNet b1.58 ternary training toggles."""

    enabled: bool = False
    # Which projections are quantised: any of attention_qkv, attention_out,
    # mamba_in, mamba_out, mlp (and lm_head / embedding, off by default).
    layers: list[str] = field(
        default_factory=lambda: ["attention_qkv", "attention_out", "mamba_in", "mamba_out", "mlp"]
    )
    # Fused quantise + straight-through kernels (Triton on GPU); False uses the
    # reference `x + (q(x) - x).detach()` pattern.
    fused: bool = True
    # Run the forward GEMM in int8 on the tensor cores where supported.
    int8_matmul: bool = False
    # Extra non-learnable RMSNorm on the activations before each quantised projection.
    subln: bool = False
    # What the backward keeps of each quantised projection's input for its weight gradient
    # (bitnet.layers.SAVED_INPUTS): "int8", the int8 values and per-token scales (1 byte an
    # element), dequantised by one more pass in the backward; "float", the fake-quantised input in
    # its dtype (2 bytes in bf16), no pass; "auto", bitnet.layers.AUTO_SAVED_INPUT's choice. The
    # gradients are the same bit for bit.
    saved_input: str = "auto"


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    # Context-parallel size: every sequence split over cp ranks (falcon_h1.context_parallel).
    cp: int = 1
    # Data-parallel size; None = world_size / (tp * pp * cp).
    dp: Optional[int] = None
    sequence_parallel: bool = False
    distributed_optimizer: bool = False
    overlap_grad_reduce: bool = True
    # Parameters per gradient all-reduce bucket of Megatron's DDP (with overlap_grad_reduce);
    # None = Megatron's default, max(4e7, 1e6 * data-parallel size).
    ddp_bucket_size: Optional[int] = None


@dataclass
class DataConfig:
    # text: documents for pretraining; chat: conversations, loss on assistant tokens only
    # (recipes/data/chat_dataset.py).
    kind: str = "text"
    # text: "bundled" = the small public-domain corpus shipped in recipes/data/corpus, or
    # Megatron indexed-dataset prefixes (path without .bin/.idx).
    # chat: .jsonl files, prefixes made by `falcon-preprocess --chat`, or "chat_demo".
    # Either kind optionally weighted: ["0.7", "/data/a_text_document", "0.3", "/data/b"].
    paths: list[str] = field(default_factory=lambda: ["bundled"])
    # "byte" = byte-level tokenizer that needs no download; "chat_demo" = the bundled chat
    # tokenizer; otherwise the path of a Hugging Face `tokenizers` JSON file (or its folder,
    # which for chat data must also hold the chat template).
    tokenizer: str = "byte"
    seq_length: int = 128
    # train,valid,test shares by document (chat: by conversation).
    split: str = "98,2,0"
    cache_dir: Optional[str] = None
    num_workers: int = 0
    # chat: whole conversations packed into each row (false: one conversation per row, padded).
    packing: bool = True
    # chat: a conversation longer than seq_length is cut to it ("truncate") or skipped ("drop").
    overlong: str = "truncate"
    # chat: held-out questions scored by greedy exact match (and answer-token loss) when the run
    # starts and after its last step (recipes/heldout_eval.py): "chat_demo" (the bundled set's) or
    # a JSON-lines file of conversations whose last message is the expected assistant answer.
    heldout: Optional[str] = None


@dataclass
class TrainConfig:
    max_steps: int = 60
    micro_batch_size: int = 8
    global_batch_size: int = 8
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 5
    lr_decay_style: str = "cosine"  # cosine | linear | constant | WSD (warmup-stable-decay)
    # WSD only: the last lr_wsd_decay_steps steps decay from lr to min_lr, in the shape
    # lr_wsd_decay_style (exponential | linear | cosine | minus_sqrt; recipes/schedules.py).
    lr_wsd_decay_steps: int = 0
    lr_wsd_decay_style: str = "exponential"
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    seed: int = 1234
    save_interval: int = 50
    # After each save, keep the newest N complete checkpoints and delete older ones (>= 1).
    keep_checkpoints: int = 3
    eval_interval: int = 0
    eval_iters: int = 2
    log_interval: int = 1
    run_dir: str = "runs/${now:%Y%m%d-%H%M%S}"
    # Continue from run_dir/checkpoints when present; false refuses to touch an existing run.
    resume: bool = True
    # A new run's initial weights: a Hugging Face FalconH1 directory or a falcon-train run dir.
    load_dir: Optional[str] = None
    # Stop after this many steps of this process (for testing resume); 0 = never.
    exit_after_steps: int = 0
    recompute: str = "none"  # none | selective | full
    # With recompute = full: recompute only the first N layers of each pipeline stage (the
    # others keep their activations: less recompute where memory allows); null = every layer.
    recompute_layers: Optional[int] = None
    # Reference kernels (pure PyTorch) even on GPU.
    force_reference_kernels: bool = False
    # Capture each step's forward + backward in one CUDA graph (Megatron's full-iteration
    # graph) after cuda_graph_warmup_steps eager steps: removes host launch overhead.
    cuda_graph: bool = False
    cuda_graph_warmup_steps: int = 2
    # Profile steps profile_step_start..profile_step_end (counted from 1; 0 = none) with torch's
    # profiler: a timeline and a table of kernels by device time under run_dir/profile/
    # (recipes/profiling.py). With cuda_graph the window starts after the capture step.
    profile_step_start: int = 0
    profile_step_end: int = 0
    # Optimizer step without Apex/Transformer Engine: foreach kernels for the gradient norm and
    # the main-to-model parameter copies (any device; Megatron's own fallbacks read every
    # parameter's norm back to the host, a sync each) and torch's fused AdamW (GPU); false: Megatron's.
    fused_optimizer: bool = True
    # Share of the optimizer state (fp32 master weights and AdamW moments, 12 bytes a bf16
    # parameter) kept in host memory and stepped there by the CPU (Megatron's
    # HybridDeviceOptimizer, its precision-aware distributed optimizer): 0 = all on the GPU, 1 = none.
    # For a model whose state does not fit beside its activations (the 7B at 64K on one H200);
    # the step then waits for the gradients' copy to the host and the CPU's AdamW.
    # Needs parallel.distributed_optimizer = true and a GPU.
    optimizer_offload_fraction: float = 0.0
    # End of training: sample this many new tokens after sample_prompt (printed with the
    # summary; recipes.generate.sample_after_training); 0 = no sample.
    sample_tokens: int = 0
    sample_prompt: str = ""


@dataclass
class LoggerConfig:
    wandb: bool = True
    # offline | online | disabled; "auto" = online when WANDB_API_KEY is set.
    wandb_mode: str = "auto"
    wandb_project: str = "falcon-h1"
    wandb_entity: Optional[str] = None
    wandb_run_name: Optional[str] = None
    tensorboard: bool = True
    mlflow: bool = False
    progress_bar: bool = True


@dataclass
class RecipeConfig:
    """One training run: what `falcon-train` composes and `recipes.run` executes."""

    name: str = "falcon_h1_tiny"
    model: FalconH1Config = field(default_factory=FalconH1Config)
    mup: MupConfig = field(default_factory=MupConfig)
    bitnet: BitNetConfig = field(default_factory=BitNetConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    dryrun: bool = False

    def run(self, executor: Optional[str] = None):
        """Validate and run this recipe (in-process, or through executor local/slurm/kubernetes)."""
        from recipes.api import run

        return run(self, executor)
