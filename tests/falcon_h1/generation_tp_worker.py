"""torchrun worker: load an HF FalconH1 directory at the TP size of the launch, generate greedily
and by sampling, check cached decoding against the training forward at every step, and save
the results from rank 0 (every rank checks its tokens equal rank 0's)."""

import sys

import torch
import torch.distributed as dist

import falcon_h1

NEW_TOKENS = 32
SAMPLING = dict(max_new_tokens=24, do_sample=True, temperature=0.9, top_k=30, top_p=0.95, seed=11)
PROMPT_LENGTHS = (13, 6)


def prompts(lengths=PROMPT_LENGTHS, vocab=97):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (n,), generator=g) for n in lengths]


def left_padded(rows):
    longest = max(len(p) for p in rows)
    ids, mask = torch.zeros(len(rows), longest, dtype=torch.long), torch.zeros(len(rows), longest, dtype=torch.long)
    for r, p in enumerate(rows):
        ids[r, longest - len(p):], mask[r, longest - len(p):] = p, 1
    return ids, mask


def main(path: str, out: str) -> None:
    dist.init_process_group("gloo")
    model = falcon_h1.from_hf(path, tp=dist.get_world_size())
    rows = prompts()
    ids, mask = left_padded(rows)
    greedy = falcon_h1.generate(model, ids, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                                return_dict_in_generate=True, output_logits=True)
    worst = 0.0
    for r, prompt in enumerate(rows):
        tokens = torch.cat([prompt, greedy.sequences[r, ids.shape[1]:]])
        with torch.no_grad():
            full = model(tokens[None])[0]
        for step in range(NEW_TOKENS):
            worst = max(worst, (greedy.logits[step][r] - full[len(prompt) + step - 1]).abs().max().item())
    sampled = falcon_h1.generate(model, ids, attention_mask=mask, **SAMPLING)
    mine = torch.cat([greedy.sequences, sampled], dim=1)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    if dist.get_rank() == 0:
        torch.save({"greedy": greedy.sequences, "sampled": sampled, "max_logit_error": worst,
                    "ranks_agree": all(torch.equal(t, mine) for t in gathered)}, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
