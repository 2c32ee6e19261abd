"""The things timed: prefill, decode (a per-token loop, and ``generate``), and a training step.

Each workload is a small class: ``prepare(model)`` returns what is timed: one function (one call per
round), or ``Steps`` (the round's steps, timed in lockstep with the other variants': decode's
forwards, a training step's forward and backward), holding whatever state the workload needs
(a KV cache, an optimizer). ``check(model)`` returns what validation
compares between variants, and ``forwards()`` lists its forward calls as (batch, new tokens,
context) for the analytical floor (benchmarks/floor.py).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from .timing import Steps


def token_ids(batch: int, seq: int, vocab: int, device: str, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=generator).to(device)


def _cache_keyword(model: nn.Module) -> str:
    """transformers 5 calls the KV cache argument ``cache``; earlier releases ``past_key_values``."""
    from transformers import GPT2LMHeadModel

    return "cache" if "cache" in inspect.signature(GPT2LMHeadModel.forward).parameters else "past_key_values"


class Prefill:
    """One forward over (batch, seq) tokens, no gradients: the logits."""

    def __init__(self, batch: int, seq: int, vocab: int, device: str):
        self.name, self.shape = "prefill", (batch, seq)
        self.ids = token_ids(batch, seq, vocab, device)

    def forwards(self) -> list[tuple[int, int, int]]:
        batch, seq = self.shape
        return [(batch, seq, seq)]

    def check(self, model: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=self.ids).logits

    def prepare(self, model: nn.Module):
        def run():
            with torch.no_grad():
                model(input_ids=self.ids)
        return run


class Decode:
    """Greedy decoding of ``tokens`` new tokens at batch 1 with a DynamicCache, one forward per token.

    A plain loop rather than ``model.generate``, so that only the model is timed (what the layers
    cost), not the logits processors and bookkeeping around it (``Generate`` times those).
    Validation compares the logits of every step.
    """

    def __init__(self, prompt: int, tokens: int, vocab: int, device: str):
        self.name, self.shape = "decode", (1, tokens)
        self.ids, self.tokens = token_ids(1, prompt, vocab, device, seed=1), tokens

    def forwards(self) -> list[tuple[int, int, int]]:
        prompt = self.ids.shape[1]  # the prompt, then one token at a time attending to all before it
        return [(1, prompt, prompt)] + [(1, 1, prompt + k) for k in range(1, self.tokens + 1)]

    def _generate(self, model: nn.Module) -> list[torch.Tensor]:
        from transformers import DynamicCache

        keyword, cache, steps = _cache_keyword(model), DynamicCache(), []
        with torch.no_grad():
            logits = model(input_ids=self.ids, use_cache=True, **{keyword: cache}).logits[:, -1]
            for _ in range(self.tokens):
                steps.append(logits)
                next_id = logits.argmax(-1, keepdim=True)                      # (1, 1)
                logits = model(input_ids=next_id, use_cache=True, **{keyword: cache}).logits[:, -1]
        return steps

    def check(self, model: nn.Module) -> list[torch.Tensor]:
        return self._generate(model)

    def prepare(self, model: nn.Module) -> Steps:
        """The prompt's forward, then one forward per token: the steps _generate runs, one by one."""
        from transformers import DynamicCache

        keyword = _cache_keyword(model)

        def start():
            state = {keyword: DynamicCache()}

            def forward(ids):
                with torch.no_grad():
                    state["logits"] = model(input_ids=ids, use_cache=True, **state).logits[:, -1]

            def next_token():
                forward(state.pop("logits").argmax(-1, keepdim=True))                  # (1, 1)
            return [lambda: forward(self.ids)] + [next_token] * self.tokens
        return Steps(start)


class Generate:
    """``model.generate``: greedy, ``tokens`` new tokens at batch 1 (what a user calls).

    Transformers' own per-step work (logits processors, stopping criteria, cache bookkeeping) is
    in the time, the same for every variant. ``min_new_tokens`` keeps every variant generating
    all ``tokens`` (no early end-of-text). Validation compares the logits of every step.
    """

    def __init__(self, prompt: int, tokens: int, vocab: int, device: str):
        self.name, self.shape = "generate", (1, tokens)
        self.ids, self.tokens = token_ids(1, prompt, vocab, device, seed=1), tokens

    def forwards(self) -> list[tuple[int, int, int]]:
        prompt = self.ids.shape[1]  # the last token is sampled from the previous forward's logits
        return [(1, prompt, prompt)] + [(1, 1, prompt + k) for k in range(1, self.tokens)]

    def _generate(self, model: nn.Module, **extra):
        with torch.no_grad():
            return model.generate(input_ids=self.ids, attention_mask=torch.ones_like(self.ids),
                                  max_new_tokens=self.tokens, min_new_tokens=self.tokens, do_sample=False,
                                  num_beams=1, pad_token_id=0, **extra)

    def check(self, model: nn.Module) -> list[torch.Tensor]:
        out = self._generate(model, output_logits=True, return_dict_in_generate=True)
        return list(out.logits)  # the (1, vocab) logits of every generated token

    def prepare(self, model: nn.Module):
        return lambda: self._generate(model)


class TrainStep:
    """Forward + backward of the language-model loss + one AdamW step over the trainable weights.

    Validation: the loss and every trainable gradient of one step from the same seed (so the
    dropout masks are the same for every eager variant).
    """

    def __init__(self, batch: int, seq: int, vocab: int, device: str, dropout: float):
        self.name, self.shape, self.dropout = "train", (batch, seq), dropout
        self.ids = token_ids(batch, seq, vocab, device, seed=2)

    def forwards(self) -> list[tuple[int, int, int]]:
        batch, seq = self.shape
        return [(batch, seq, seq)]

    def _loss(self, model: nn.Module) -> torch.Tensor:
        return model(input_ids=self.ids, labels=self.ids).loss

    def check(self, model: nn.Module) -> list[torch.Tensor]:
        model.train()
        torch.manual_seed(0)
        loss = self._loss(model)
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        model.zero_grad(set_to_none=True)
        return [loss.detach()] + grads

    def prepare(self, model: nn.Module) -> Steps:
        """Two steps: the forward (the loss), then backward and the optimizer step."""
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def start():
            state = {}

            def forward():
                state["loss"] = self._loss(model)

            def backward_and_step():
                state.pop("loss").backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            return [forward, backward_and_step]
        return Steps(start)
