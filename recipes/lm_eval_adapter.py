"""lm-evaluation-harness model adapter: its tasks run on a falcon-train checkpoint (or a Hugging
Face directory) through this project's model, without exporting it.

    falcon-eval runs/my-run --tasks my_task --include-path tasks/      # the usual way
    lm_eval.simple_evaluate(model=FalconH1LM(pretrained="runs/my-run"), tasks=[...])

Scoring follows lm-eval's Hugging Face model (`HFLM`): continuations are scored after their
context (the whole text tokenized, then split), an empty context is the end-of-document token,
rolling log-likelihoods use lm-eval's disjoint windows of max_length tokens, and
generate_until decodes with falcon_h1.generate and cuts the text at the first stop string.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from lm_eval import utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs


@register_model("falcon_h1")
class FalconH1LM(TemplateLM):
    def __init__(self, pretrained: Optional[str] = None, tp: int = 1, batch_size: int = 8,
                 max_length: Optional[int] = None, max_gen_toks: int = 256, tokenizer: Optional[str] = None,
                 loaded=None, **unsupported):
        """pretrained: a run directory or a Hugging Face directory (or `loaded`, an already
        loaded recipes.inference.InferenceModel). Strings from lm-eval's --model_args are accepted."""
        super().__init__()
        if unsupported:
            raise ValueError(f"falcon_h1 model arguments {sorted(unsupported)} are not supported; allowed: "
                             "pretrained, tp, batch_size, max_length, max_gen_toks, tokenizer.")
        from recipes.inference import load_for_inference, require_tokenizer

        if loaded is None:
            if pretrained is None:
                raise ValueError("falcon_h1 needs pretrained=PATH (a run directory or a Hugging Face directory).")
            loaded = load_for_inference(pretrained, tp=int(tp), tokenizer=tokenizer)
        self.model = loaded.model
        self.text = require_tokenizer(loaded, pretrained or "the loaded model")
        self._max_length = int(max_length) if max_length is not None else loaded.max_length
        self.batch_size = int(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        self._model_device = next(self.model.parameters()).device

    @property
    def eot_token_id(self) -> int:
        return self.text.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        return self.text.encode(string)

    def tok_decode(self, tokens, **kwargs) -> str:
        return self.text.decode(tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(key, context ids, continuation ids) -> (sum of the continuation's log-probs, whether
        greedy decoding would produce it). Rows are right-padded together: a causal model's
        scores before the padding do not depend on it."""
        results: list[Optional[tuple[float, bool]]] = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            windows = []
            for i in chunk:
                _, context, continuation = requests[i]
                whole = (list(context) + list(continuation))[-(self.max_length + 1):]
                windows.append((whole[:-1], whole[1:], len(continuation)))
            longest = max(len(w[0]) for w in windows)
            ids = torch.full((len(windows), longest), self.eot_token_id, dtype=torch.long)
            for r, (inputs, _, _) in enumerate(windows):
                ids[r, :len(inputs)] = torch.tensor(inputs)
            with torch.no_grad():
                logprobs = F.log_softmax(self.model(ids.to(self._model_device)).float(), dim=-1)
            for r, (inputs, targets, n) in enumerate(windows):
                rows = logprobs[r, len(inputs) - n:len(inputs)]           # predicts the last n targets
                wanted = torch.tensor(targets[-n:], device=rows.device)
                score = rows.gather(-1, wanted[:, None]).sum().item()
                greedy = bool((rows.argmax(-1) == wanted).all())
                results[chunk[r]] = (score, greedy)
        for (key, _, _), result in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        totals = []
        for (string,) in [req.args for req in requests]:
            windows = map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1))
            scores = self._loglikelihood_tokens([(None, context, continuation) for context, continuation in windows])
            total = sum(score for score, _ in scores)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            totals.append(total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from recipes.generate import complete

        out = []
        for context, gen_kwargs in [req.args for req in requests]:
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=None)
            max_new = kwargs.pop("max_gen_toks")
            do_sample = bool(kwargs.pop("do_sample", False))
            temperature = kwargs.pop("temperature", 0.0)
            settings = {"max_new_tokens": max_new, "do_sample": do_sample}
            if do_sample:
                settings.update(temperature=temperature, top_k=kwargs.pop("top_k", None),
                                top_p=kwargs.pop("top_p", None), seed=kwargs.pop("seed", None))
            if kwargs:
                raise ValueError(f"generation_kwargs {sorted(kwargs)} are not supported by falcon_h1; allowed: "
                                 "until, max_gen_toks, do_sample, temperature, top_k, top_p, seed.")
            ids = self.tok_encode(context)[-(self.max_length - max_new):] or [self.eot_token_id]
            text = complete(self.model, self.text, [ids], **settings)[0]
            for stop in until:
                if stop and stop in text:
                    text = text.split(stop)[0]
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out
