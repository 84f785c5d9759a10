"""Which chunks of a sequence a context-parallel rank holds, and the all-gather between ranks.

The sequence is cut into 2 * cp equal chunks; rank r holds chunks r and 2cp-1-r, in that
order (Megatron's load-balanced convention: under a causal mask every rank then does the
same attention work). A rank's tokens are its chunks concatenated.

`ContextParallelLayout.emulated(cp)` runs every rank in one process: its "local" sequence is
all ranks' shards concatenated in rank order and its all-gather returns its input. The layers
then run exactly the code of a real context-parallel run, minus the collective, which makes
context parallelism testable (and the GPU kernels comparable) in one process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


def rank_chunks(cp: int, rank: int) -> tuple[int, int]:
    """The global chunk numbers rank `rank` holds, in its order."""
    return rank, 2 * cp - 1 - rank


@dataclass(frozen=True)
class ContextParallelLayout:
    cp: int
    local_chunks: tuple[int, ...]     # global chunk numbers of this rank's tokens, in order
    gathered_chunks: tuple[int, ...]  # global chunk numbers of what `gather` returns, in order
    group: Optional[dist.ProcessGroup] = None  # None: all ranks emulated in this process

    @staticmethod
    def for_rank(cp: int, rank: int, group: dist.ProcessGroup) -> "ContextParallelLayout":
        every = tuple(g for q in range(cp) for g in rank_chunks(cp, q))
        return ContextParallelLayout(cp, rank_chunks(cp, rank), every, group)

    @staticmethod
    def emulated(cp: int) -> "ContextParallelLayout":
        every = tuple(g for q in range(cp) for g in rank_chunks(cp, q))
        return ContextParallelLayout(cp, every, every, None)

    @staticmethod
    def current() -> Optional["ContextParallelLayout"]:
        """This process's layout from Megatron's parallel state; None without context parallelism."""
        from megatron.core import parallel_state

        cp = parallel_state.get_context_parallel_world_size()
        if cp == 1:
            return None
        return ContextParallelLayout.for_rank(cp, parallel_state.get_context_parallel_rank(),
                                              parallel_state.get_context_parallel_group())

    @property
    def n_chunks(self) -> int:
        return 2 * self.cp

    def chunk_length(self, local_length: int) -> int:
        if local_length % len(self.local_chunks):
            raise ValueError(f"a context-parallel shard of {local_length} tokens does not split into "
                             f"{len(self.local_chunks)} equal chunks")
        return local_length // len(self.local_chunks)

    def sequence_length(self, local_length: int) -> int:
        """The whole sequence's length, from this rank's share of it."""
        return self.chunk_length(local_length) * self.n_chunks

    def slot(self, chunk: int) -> int:
        """Where global chunk `chunk` sits among the gathered chunks."""
        return self.gathered_chunks.index(chunk)

    def positions(self, local_length: int, device=None) -> torch.Tensor:
        """Global positions [local_length] of this rank's tokens (made on the device: no copy)."""
        c = self.chunk_length(local_length)
        return torch.cat([torch.arange(g * c, (g + 1) * c, device=device) for g in self.local_chunks])

    def shard(self, full: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's tokens of a whole-sequence tensor (sequence along `dim`)."""
        length = full.shape[dim]
        if length % self.n_chunks:
            raise ValueError(f"a sequence of {length} tokens does not split into 2 * cp = {self.n_chunks} "
                             "equal chunks")
        c = length // self.n_chunks
        return torch.cat([full.narrow(dim, g * c, c) for g in self.local_chunks], dim=dim)

    def in_sequence_order(self, gathered: torch.Tensor, dim: int) -> torch.Tensor:
        """The gathered chunks (along `dim`, in `gathered_chunks` order) put in sequence order."""
        c = gathered.shape[dim] // len(self.gathered_chunks)
        return torch.cat([gathered.narrow(dim, self.slot(g) * c, c) for g in range(self.n_chunks)], dim=dim)

    def unshard(self, shards: list[torch.Tensor], dim: int) -> torch.Tensor:
        """Whole-sequence tensor from every rank's shard (rank order), e.g. to compare logits."""
        return self.in_sequence_order(torch.cat(shards, dim=dim), dim)

    def gather(self, local: torch.Tensor, dim: int) -> torch.Tensor:
        """Every rank's `local` concatenated along `dim` in rank order (the `gathered_chunks`
        order when dim is the sequence); the backward sums each rank's gradient contributions
        back onto its own slice (a reduce-scatter)."""
        if self.group is None:
            if self.local_chunks != self.gathered_chunks:
                raise ValueError("this layout has no process group to gather the other ranks' chunks over; "
                                 "ContextParallelLayout.emulated(cp) holds every rank's chunks in one process")
            return local
        return _AllGather.apply(local, dim, self.group)


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local, dim, group):
        ctx.dim, ctx.group = dim, group
        world = dist.get_world_size(group)
        moved = local.movedim(dim, 0).contiguous()
        out = moved.new_empty((world * moved.shape[0], *moved.shape[1:]))
        if dist.get_backend(group) == dist.Backend.NCCL:
            dist.all_gather_into_tensor(out, moved, group=group)
        else:  # gloo: list form
            dist.all_gather(list(out.chunk(world)), moved, group=group)
        return out.movedim(0, dim)

    @staticmethod
    def backward(ctx, grad):
        group, dim = ctx.group, ctx.dim
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        grad = grad.movedim(dim, 0).contiguous()
        if dist.get_backend(group) == dist.Backend.NCCL:
            mine = grad.new_empty((grad.shape[0] // world, *grad.shape[1:]))
            dist.reduce_scatter_tensor(mine, grad, group=group)
        else:  # gloo has no reduce-scatter: sum everywhere, keep this rank's slice
            dist.all_reduce(grad, group=group)
            mine = grad.chunk(world)[rank]
        return mine.movedim(0, dim), None, None
