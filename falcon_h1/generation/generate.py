"""`generate`: prompts in, prompts followed by new tokens out, as Hugging Face's `generate`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from falcon_h1.errors import is_int_at_least
from falcon_h1.generation import cache as caches
from falcon_h1.generation import model_access as access
from falcon_h1.generation.decode import CachedMixer, StepHolder, StepPositions, decode_step
from falcon_h1.generation.graphed import GraphedDecode, cuda_graph_choice
from falcon_h1.generation.sampling import Sampler


@dataclass
class GenerateOutput:
    sequences: torch.Tensor                      # [b, prompt + new]
    logits: Optional[tuple[torch.Tensor, ...]]   # per new token: [b, vocab] (fp32) it was chosen from


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int = 20,
    do_sample: bool = False,
    attention_mask: Optional[torch.Tensor] = None,
    temperature: Optional[float] = None,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    eos_token_id: Union[int, Sequence[int], None] = None,
    pad_token_id: Optional[int] = None,
    seed: Optional[int] = None,
    streamer=None,
    return_dict_in_generate: bool = False,
    output_logits: bool = False,
    cuda_graph: Optional[bool] = None,
):
    """Continue each prompt of `input_ids` [b, L] by up to `max_new_tokens` tokens.

    Rows of different lengths are left-padded with `attention_mask` (1 = token, 0 = padding
    before it), as Hugging Face tokenizers pad for generation. Each prompt is prefilled on
    its own tokens only (padding never reaches a cache), then all rows decode together.
    Greedy unless do_sample; sampling applies temperature, then top_k, then top_p (none of
    them by default: Hugging Face's GenerationConfig defaults to top_k = 50) and draws from a
    torch.Generator seeded with `seed`. A row stops at any of `eos_token_id` and is filled
    with `pad_token_id` (default: the first eos id) until every row has stopped or
    max_new_tokens are generated. `streamer` (Hugging Face's protocol: put(ids), end()) gets
    the prompt, then each step's new tokens [b].

    Tensor parallel: call on every rank of the group with the same arguments; the sampled
    tokens agree because every rank draws from the same gathered logits with the same seed.

    cuda_graph: replay decode steps from one CUDA graph (None: wherever possible, a CUDA
    device at tensor-parallel size 1; the tokens are the same either way).

    Returns [b, L + new] (the input, padding included, then the new tokens), or with
    return_dict_in_generate a GenerateOutput, whose logits are filled when output_logits.
    """
    access.check_can_generate(model)
    sampler = Sampler.of(do_sample, temperature, top_k, top_p, seed)
    prompts = _prompts(input_ids, attention_mask, model.cfg.vocab_size)
    if not is_int_at_least(max_new_tokens, 1):
        raise ValueError(f"max_new_tokens = {max_new_tokens!r}; allowed: an integer >= 1.")
    eos = _eos_ids(eos_token_id, model.cfg.vocab_size, input_ids.device)
    graphed = cuda_graph_choice(cuda_graph, model, input_ids.device)
    pad = _pad_id(pad_token_id, eos, model.cfg.vocab_size)
    if streamer is not None:
        streamer.put(input_ids.cpu())
    was_training = model.training
    model.eval()
    try:
        new_tokens, logits = _generate(model, prompts, max_new_tokens, sampler, eos, pad, streamer, output_logits,
                                      graphed)
    finally:
        model.train(was_training)
    sequences = torch.cat([input_ids, new_tokens.to(input_ids.dtype)], dim=1)
    if streamer is not None:
        streamer.end()
    if return_dict_in_generate:
        return GenerateOutput(sequences, tuple(logits) if output_logits else None)
    return sequences


def _generate(model, prompts, max_new_tokens, sampler, eos, pad, streamer, keep_logits, graphed):
    device = prompts[0].device
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    longest = max(len(p) for p in prompts)
    capacity = longest + max_new_tokens
    layer_caches = {i: caches.allocate(m, len(prompts), capacity, model.config.params_dtype, device)
                    for i, m in access.mixers(model)}
    logits = _prefill(model, prompts, layer_caches)
    generator = sampler.generator(device)
    holder = StepHolder()
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    out, kept = [], []
    replay = GraphedDecode(model, holder, len(prompts), capacity, device) if graphed else None

    def step_logits(tokens, step):
        if replay is not None:
            return replay(tokens, lengths + step)
        # eagerly, attention spans only the slots filled so far
        return decode_step(model, tokens, holder, StepPositions.at(lengths + step, longest + step + 1))

    with access.mixers_replaced(model, lambda i, m: CachedMixer(m, layer_caches[i], holder)):
        for step in range(max_new_tokens):
            if keep_logits:
                kept.append(logits.float())
            tokens = sampler.next_tokens(logits, generator)
            if eos is not None:
                tokens = torch.where(finished, pad, tokens)
                finished |= torch.isin(tokens, eos)
            out.append(tokens)
            if streamer is not None:
                streamer.put(tokens.cpu())
            if step + 1 == max_new_tokens or (eos is not None and bool(finished.all())):
                break
            logits = step_logits(tokens, step)
    return torch.stack(out, dim=1), kept


def _prefill(model, prompts, layer_caches) -> torch.Tensor:
    """Fill the caches from each prompt (prompts of one length together); returns the
    last-position logits [b, vocab] of every prompt."""
    by_length: dict[int, list[int]] = {}
    for row, prompt in enumerate(prompts):
        by_length.setdefault(len(prompt), []).append(row)
    logits = [None] * len(prompts)
    for rows in by_length.values():
        ids = torch.stack([prompts[r] for r in rows])
        into = caches.row_index(rows, ids.device)

        def attention(index, mixer, qkv, freqs, into=into):
            caches.fill_attention(layer_caches[index], into, mixer, qkv, freqs)

        def mamba(index, mixer, zxbcdt, into=into):
            caches.fill_mamba(layer_caches[index], into, mixer, zxbcdt)

        with access.branch_inputs_seen_by(model, attention, mamba), access.last_position_logits(model):
            last = model(ids)[:, -1]
        for j, r in enumerate(rows):
            logits[r] = last[j]
    return torch.stack(logits)


def _prompts(input_ids, attention_mask, vocab_size: int) -> list[torch.Tensor]:
    """The unpadded prompt of each row, from left-padded input_ids and attention_mask."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype.is_floating_point:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids = {shape}; allowed: an integer tensor [batch, length].")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids has no tokens; allowed: at least one prompt token per row.")
    if attention_mask is None:
        rows = list(input_ids)
    else:
        if tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids shape "
                             f"{tuple(input_ids.shape)}; allowed: the same shape.")
        mask = attention_mask.bool()
        starts = (~mask).sum(1)
        # left padding: every row is zeros then ones
        if not torch.equal(mask, torch.arange(mask.shape[1], device=mask.device)[None] >= starts[:, None]):
            raise ValueError("attention_mask is not left padding (zeros, then ones, in every row); allowed: left "
                             "padding as a tokenizer with padding_side='left' makes it.")
        if bool((starts == mask.shape[1]).any()):
            raise ValueError("attention_mask has a row of only zeros; allowed: at least one prompt token per row.")
        rows = [row[int(s):] for row, s in zip(input_ids, starts)]
    for r, row in enumerate(rows):
        if bool(((row < 0) | (row >= vocab_size)).any()):
            raise ValueError(f"input_ids row {r} holds token ids outside 0..{vocab_size - 1} (model.vocab_size = "
                             f"{vocab_size}).")
    return [row.long() for row in rows]


def _eos_ids(eos_token_id, vocab_size: int, device) -> Optional[torch.Tensor]:
    if eos_token_id is None:
        return None
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if not ids or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab_size for i in ids):
        raise ValueError(f"eos_token_id = {eos_token_id!r}; allowed: a token id or a list of token ids in "
                         f"0..{vocab_size - 1}.")
    return torch.tensor(ids, device=device)


def _pad_id(pad_token_id, eos, vocab_size: int) -> int:
    if pad_token_id is None:
        return int(eos[0]) if eos is not None else 0
    if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int) or not 0 <= pad_token_id < vocab_size:
        raise ValueError(f"pad_token_id = {pad_token_id!r}; allowed: a token id in 0..{vocab_size - 1}.")
    return pad_token_id

