"""Choosing the next token from logits: greedy, or sampling with temperature, top-k and
top-p (nucleus) filtering, in Hugging Face's order (temperature, then top-k, then top-p)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from falcon_h1.errors import is_int_at_least


@dataclass(frozen=True)
class Sampler:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: Optional[int] = None      # keep the k most likely tokens; None: no top-k filter
    top_p: Optional[float] = None    # keep the smallest set whose probability reaches top_p; None: off
    seed: Optional[int] = None       # seeds the torch.Generator draws come from

    @staticmethod
    def of(do_sample: bool, temperature, top_k, top_p, seed) -> "Sampler":
        """Validated; a sampling setting given with do_sample=False is an error (it would do nothing)."""
        if not do_sample:
            given = {k: v for k, v in dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed).items()
                     if v is not None}
            if given:
                raise ValueError(f"{', '.join(f'{k} = {v!r}' for k, v in given.items())} given with do_sample = "
                                 "False (greedy decoding uses none of them); allowed: do_sample = True, or leave "
                                 "them unset.")
            return Sampler()
        if temperature is not None and not temperature > 0:
            raise ValueError(f"temperature = {temperature!r}; allowed: a number > 0 (greedy: do_sample = False).")
        if top_k is not None and not is_int_at_least(top_k, 1):
            raise ValueError(f"top_k = {top_k!r}; allowed: an integer >= 1, or None for no top-k filter.")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p = {top_p!r}; allowed: 0 < top_p <= 1, or None for no top-p filter.")
        return Sampler(True, 1.0 if temperature is None else float(temperature), top_k, top_p, seed)

    def generator(self, device: torch.device) -> Optional[torch.Generator]:
        if not self.do_sample:
            return None
        gen = torch.Generator(device=device)
        if self.seed is None:
            gen.seed()
        else:
            gen.manual_seed(self.seed)
        return gen

    def filtered_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [b, V] -> temperature-scaled logits with filtered tokens at -inf (fp32)."""
        scores = logits.float() / self.temperature
        if self.top_k is not None and self.top_k < scores.shape[-1]:
            kth = torch.topk(scores, self.top_k, dim=-1).values[..., -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.top_p is not None and self.top_p < 1.0:
            ascending, order = torch.sort(scores, dim=-1)
            cumulative = ascending.softmax(-1).cumsum(-1)
            drop = cumulative <= 1.0 - self.top_p  # the least likely tokens whose total stays below 1 - top_p
            drop[..., -1] = False                  # the most likely token always stays
            scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
        return scores

    def next_tokens(self, logits: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
        """logits [b, V] -> token ids [b]."""
        if not self.do_sample:
            return logits.argmax(-1)
        probs = self.filtered_logits(logits).softmax(-1)
        return torch.multinomial(probs, 1, generator=generator)[:, 0]
