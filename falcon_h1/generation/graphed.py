"""Decode steps replayed from one CUDA graph.

A decode step is a few hundred small kernels (per layer: the projections, the conv and SSM
updates, attention over the cache, norms, the MLP), each far shorter than the host's time to
launch it, so an eager step is bound by the launches, not by the GPU. The step's shapes never
change when attention always spans the whole cache (slots past a row's position are masked
out), so it is captured once and replayed for every token: the launches then cost one graph
launch per token.
"""

from __future__ import annotations

import torch

from falcon_h1.generation.decode import StepHolder, StepPositions, decode_step


def cuda_graph_choice(requested, model, device: torch.device) -> bool:
    """Whether to replay decode steps from a CUDA graph: `requested` (None = on wherever it
    can be: a CUDA device and one tensor-parallel rank), refused where it cannot be."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    possible = device.type == "cuda" and tp == 1
    if requested is None:
        return possible
    if not isinstance(requested, bool):
        raise ValueError(f"cuda_graph = {requested!r}; allowed: True, False or None (on where possible).")
    if requested and not possible:
        where = f"the prompts are on {device.type}" if device.type != "cuda" else f"parallel.tp = {tp}"
        raise ValueError(f"cuda_graph = True, but {where}; allowed: a CUDA device at parallel.tp = 1 "
                         "(or cuda_graph = False / None).")
    return requested


class GraphedDecode:
    """decode_step(model, tokens, positions) for `batch` rows over a cache of `capacity` slots:
    the first call runs eagerly (lazy initialisation and kernel compilation must not happen in
    a capture) and captures the step; later calls copy their inputs into the captured buffers
    and replay it. Returns fresh logits [b, vocab] each call."""

    def __init__(self, model, holder: StepHolder, batch: int, capacity: int, device: torch.device):
        self.model, self.holder, self.capacity = model, holder, capacity
        self.tokens = torch.zeros(batch, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    def _step(self) -> torch.Tensor:
        return decode_step(self.model, self.tokens, self.holder, StepPositions.at(self.positions, self.capacity))

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens)
        self.positions.copy_(positions)
        if self.graph is not None:
            self.graph.replay()
            return self.logits.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            logits = self._step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.logits = self._step()
        except RuntimeError as error:
            raise RuntimeError(f"capturing the decode step as a CUDA graph failed ({error}); generate with "
                               "cuda_graph=False to decode eagerly.") from error
        self.graph = graph
        return logits
