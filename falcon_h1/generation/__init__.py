"""Text generation for the Falcon-H1 model: prefill with the training forward, then one
token at a time from per-layer caches (attention K/V, Mamba-2 conv window and SSM state),
so a Mamba-2 decode step costs the same at every position."""

from falcon_h1.generation.generate import GenerateOutput, generate

__all__ = ["GenerateOutput", "generate"]
