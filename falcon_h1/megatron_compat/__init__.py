"""What this project does to run Megatron Core 0.19.2 (pinned in pyproject.toml): every
workaround and CPU shim lives here, one module per concern, each naming the Megatron version
and the symptom it answers, so an upgrade starts (and, once a fix lands upstream, ends) here.

- `cpu`: Megatron Core on a host without CUDA (tests, the CPU demo): the process-wide
  `torch.cuda` patches, the CPU RNG tracker, `cuda_as_cpu` for code that hard-codes "cuda".
- `parallel`: torch.distributed + Megatron's parallel state for this process, on GPU or CPU.
- `transformer`: Megatron's fused-op switches (off) and activation recomputation on CPU.
- `optimizer`: the optimizer step without Apex/Transformer Engine (foreach kernels in place of
  Megatron's per-tensor fallbacks, torch's fused AdamW inside Megatron's optimizer).
- `optimizer_checkpoint`: saving and loading Megatron's optimizers (bf16 with fp32 parameters,
  the distributed optimizer with torch's AdamW).
- `dist_checkpointing`: Megatron's torch_dist checkpoint writer, synchronous and in-process.
- `cuda_graph`: Megatron's full-iteration CUDA graph (class-level state, capture stream, RNG).
"""
