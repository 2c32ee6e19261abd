"""Several adapters in one batch: row i of the batch runs with its own adapter (``adapter_names``).

Serving many fine-tunes of one base model batches their requests together; every row then needs
``h = W0 x + s_i B_i A_i x`` with the adapter i of that row. Ways to compute it, timed on the same
batch against **one merged adapter** (the base model's cost: no implementation can beat it):

- ``peft-mixed``: PEFT's ``adapter_names`` (``lora.Linear._mixed_batch_forward``, peft 0.21):
  the base matmul over the whole batch, then for each adapter a Python loop step that indexes
  its rows out of x, runs ``B(A(x_rows)) * s`` and adds the result back into those rows.
- ``minilora-mixed``: minilora's own mixed batch (``minilora.mixed_batch``, where this minilora has
  it): PEFT's computation, one gather and scatter-add per adapter and layer.
- ``gathered``: the Punica / S-LoRA form in plain PyTorch. Every adapter's A and B are stacked
  once, (n, r, in) and (n, out, r); per call each row's pair is gathered by its adapter index and
  two batched matmuls add every row's update at once, without a loop over adapters::

      xa  = bmm(x, A[idx]^T) * s[idx]          (batch, seq, in) @ (batch, in, r) -> (batch, seq, r)
      out = baddbmm(W0 x + b, xa, B[idx]^T)    (batch, seq, r) @ (batch, r, out) -> (batch, seq, out)

  The gather copies batch * r * (in + out) numbers per layer: for r = 8 that is about 1% of a
  GPT-2 layer's weight per row (what S-LoRA's custom kernels avoid by reading in place).

Before anything is timed, every variant's logits (prefill; every decode step) are compared, row by
row, with the reference path running that row alone with only its adapter active.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

import minilora
from minilora.inject import lora_layers

from .workloads import _cache_keyword, token_ids


# ------------------------------------------------------------------------------------------------
# The gathered form
# ------------------------------------------------------------------------------------------------
def stack_adapters(layer, names: list[str]) -> None:
    """Stack the adapters' A, B and scaling of one layer in ``names`` order (equal ranks)."""
    ranks = {layer.lora_A[name].weight.shape[0] for name in names}
    if len(ranks) != 1:
        raise ValueError(f"the gathered form stacks adapters of one rank; got ranks {sorted(ranks)}")
    layer._stacked = (torch.stack([layer.lora_A[name].weight.detach() for name in names]),   # (n, r, in)
                      torch.stack([layer.lora_B[name].weight.detach() for name in names]),   # (n, out, r)
                      torch.tensor([layer.scaling[name] for name in names],
                                   dtype=layer.lora_A[names[0]].weight.dtype,
                                   device=layer.lora_A[names[0]].weight.device))             # (n,)


def gathered_forward(layer, x: torch.Tensor) -> torch.Tensor:
    """h_i = W0 x_i + b + s_i B_i A_i x_i for every row i, by gathering each row's (A, B)."""
    stacked_A, stacked_B, scaling = layer._stacked
    assert x.dim() == 3, "the gathered form takes (batch, seq, in) inputs"
    rows = layer._rows.index                                          # (batch,) adapter index of each row
    out = layer.base_layer(x)                                         # (batch, seq, out)
    xa = torch.bmm(x, stacked_A[rows].transpose(1, 2))               # (batch, seq, in) @ (batch, in, r)
    xa.mul_(scaling[rows].view(-1, 1, 1))                             # s_i on the (batch, seq, r) side
    return out.baddbmm_(xa, stacked_B[rows].transpose(1, 2))         # += (batch, seq, r) @ (batch, r, out)


class Rows:
    """The adapter index of every row of the next call, shared by all layers of a gathered model."""

    index: torch.Tensor | None = None


def gathered_model(model: nn.Module, names: list[str]) -> nn.Module:
    """Turn a minilora model holding ``names`` into the gathered form; ``model._rows.index`` selects."""
    rows = Rows()
    for _, layer in lora_layers(model):
        stack_adapters(layer, names)
        layer._rows = rows
        layer.forward_override = gathered_forward
    model._rows, model._adapter_order = rows, list(names)
    return model


# ------------------------------------------------------------------------------------------------
# Building the models: one minilora model with n adapters, its PEFT twin
# ------------------------------------------------------------------------------------------------
def adapter_name(i: int) -> str:
    return "default" if i == 0 else f"adapter{i}"


def minilora_with_adapters(base: nn.Module, config: minilora.LoraConfig, n: int, seed: int) -> nn.Module:
    """``base`` with n adapters of the config's rank on its targets, each with random non-zero A and B."""
    model = minilora.inject(copy.deepcopy(base), config)
    generator = torch.Generator().manual_seed(seed)
    for _, layer in lora_layers(model):
        for i in range(1, n):
            layer.add_adapter(adapter_name(i), config.r, config.lora_alpha)
        for i in range(n):
            for weight in (layer.lora_A[adapter_name(i)].weight, layer.lora_B[adapter_name(i)].weight):
                with torch.no_grad():
                    weight.copy_(torch.randn(weight.shape, generator=generator) * 0.05)
        layer.set_adapter(adapter_name(0), inference_mode=True)
    return model.eval()


def peft_with_adapters(base: nn.Module, config: minilora.LoraConfig, source: nn.Module, n: int) -> nn.Module:
    """PEFT's model with the same n adapters as the minilora model ``source``."""
    import peft

    from parity.twins import peft_config

    model = peft.get_peft_model(copy.deepcopy(base), peft_config(config))
    for i in range(1, n):
        model.add_adapter(adapter_name(i), peft_config(config))
    ours = dict(lora_layers(source))
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, peft.tuners.lora.LoraLayer):
                layer = ours[name.removeprefix("base_model.model.")]
                for i in range(n):
                    module.lora_A[adapter_name(i)].weight.copy_(layer.lora_A[adapter_name(i)].weight)
                    module.lora_B[adapter_name(i)].weight.copy_(layer.lora_B[adapter_name(i)].weight)
    return model.eval()


def merged_single(source: nn.Module) -> nn.Module:
    """One adapter (the first, the active one) merged into W0: the base model's cost, the floor of
    every variant (the other adapters stay in the layers, inactive)."""
    return minilora.set_forward_path(copy.deepcopy(source), "merged")


# ------------------------------------------------------------------------------------------------
# Calls: a forward with each row's adapter, per variant
# ------------------------------------------------------------------------------------------------
def forward_function(variant: str, model: nn.Module, names: list[str]):
    """(input_ids, **kwargs) -> logits, with row i using adapter names[i] (merged: its one adapter)."""
    if variant == "minilora-mixed" and hasattr(minilora, "mixed_batch"):
        def run(ids, **kwargs):
            with minilora.mixed_batch(model, names):
                return model(input_ids=ids, **kwargs).logits
        return run
    if variant in ("peft-mixed", "minilora-mixed"):
        return lambda ids, **kwargs: model(input_ids=ids, adapter_names=names, **kwargs).logits
    if variant == "gathered":
        index = torch.tensor([model._adapter_order.index(name) for name in names],
                             device=next(model.parameters()).device)

        def run(ids, **kwargs):
            model._rows.index = index
            return model(input_ids=ids, **kwargs).logits
        return run
    return lambda ids, **kwargs: model(input_ids=ids, **kwargs).logits


class MixedPrefill:
    """One forward over (batch, seq) tokens, row i with adapter i mod n; checked row by row."""

    def __init__(self, batch: int, seq: int, vocab: int, device: str):
        self.name, self.shape = "prefill", (batch, seq)
        self.ids = token_ids(batch, seq, vocab, device, seed=3)

    def forwards(self) -> list[tuple[int, int, int]]:
        batch, seq = self.shape
        return [(batch, seq, seq)]

    def tokens(self) -> int:
        return self.shape[0] * self.shape[1]

    def run(self, forward) -> list[torch.Tensor]:
        with torch.no_grad():
            return [forward(self.ids)]


class MixedDecode:
    """Greedy decoding of ``tokens`` tokens for a batch of prompts, one forward per token (KV cache)."""

    def __init__(self, batch: int, prompt: int, tokens: int, vocab: int, device: str):
        self.name, self.shape = "decode", (batch, tokens)
        self.ids, self.steps = token_ids(batch, prompt, vocab, device, seed=4), tokens

    def forwards(self) -> list[tuple[int, int, int]]:
        batch, prompt = self.ids.shape
        return [(batch, prompt, prompt)] + [(batch, 1, prompt + k) for k in range(1, self.steps + 1)]

    def tokens(self) -> int:
        return self.shape[0] * self.shape[1]

    def run(self, forward, rows: slice = slice(None)) -> list[torch.Tensor]:
        from transformers import DynamicCache

        keyword, cache, steps = _cache_keyword(None), DynamicCache(), []
        with torch.no_grad():
            logits = forward(self.ids[rows], use_cache=True, **{keyword: cache})[:, -1]
            for _ in range(self.steps):
                steps.append(logits)
                next_ids = logits.argmax(-1, keepdim=True)                  # (batch, 1)
                logits = forward(next_ids, use_cache=True, **{keyword: cache})[:, -1]
        return steps


def ignores_adapter_names(workload, model: nn.Module, got: list[torch.Tensor]) -> bool:
    """True when ``got`` (a call with ``adapter_names``) equals a plain call: the argument was ignored."""
    from .variants import relative_difference

    plain = workload.run(lambda ids, **kwargs: model(input_ids=ids, **kwargs).logits)
    return relative_difference(got, plain) == 0.0


def rows_alone(workload, reference: nn.Module, names: list[str]) -> list[torch.Tensor]:
    """What each row gives run alone with only its adapter active (reference path), stacked back."""
    per_row = []
    for i, name in enumerate(names):
        for _, layer in lora_layers(reference):
            layer.set_adapter(name, inference_mode=True)
        forward = lambda ids, **kwargs: reference(input_ids=ids, **kwargs).logits
        if isinstance(workload, MixedPrefill):
            with torch.no_grad():
                per_row.append([forward(workload.ids[i:i + 1])])
        else:
            per_row.append(workload.run(forward, rows=slice(i, i + 1)))
    return [torch.cat([row[step] for row in per_row]) for step in range(len(per_row[0]))]
