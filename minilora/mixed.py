"""Mixed batches: one adapter per row of a batch, at inference (PEFT's ``adapter_names=[...]``).

    with minilora.mixed_batch(model, ["default", "other", "__base__", "default"]):
        logits = model(input_ids).logits        # row 0 and 3: default, row 1: other, row 2: no adapter

Each LoRA layer computes the base output for the whole batch, then, for each adapter named, adds
its update to that adapter's rows only:

    h[rows_a] = W0 x[rows_a] + s_a B_a A_a x[rows_a]        ("__base__" rows: W0 x only)

The rows of one adapter are gathered and computed together (one pair of small matmuls per adapter
and layer, never a Python loop over rows), in PEFT's operations, so the outputs are bitwise PEFT's.
``minilora.compat``'s PeftModel takes PEFT's calling form, ``model(x, adapter_names=[...])`` and
``model.generate(..., adapter_names=[...])``, and runs it in this block.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from .config import MiniLoraError
from .inject import require_lora_layers
from .layer import LoraLinear
from .saved_modules import saved_modules

BASE = "__base__"  # the rows that get no adapter (PEFT's name)


@contextlib.contextmanager
def mixed_batch(model: nn.Module, adapter_names: list[str],
                encoder_adapter_names: list[str] | None = None) -> Iterator[nn.Module]:
    """Inside the block, row i of every batch the model sees uses adapter ``adapter_names[i]``: in
    each LoRA layer, and in each modules_to_save module (that adapter's copy; the original for
    "__base__"), as PEFT.

    ``encoder_adapter_names``: the rows of the layers inside ``model.get_encoder()`` instead. Beam search
    on an encoder-decoder (T5, BART) runs the encoder once per input and the decoder once per beam, so
    PEFT gives the decoder each name repeated per beam and the encoder the names as passed.

    Raises:
        MiniLoraError: before changing anything, if the model is in training mode, a name is no
            adapter of the model, or a layer is merged (as PEFT); inside, if a batch has another
            number of rows than ``adapter_names``.
    """
    layers = [layer for _, layer in require_lora_layers(model, "mixed_batch")]
    if isinstance(adapter_names, str) or not all(isinstance(name, str) for name in adapter_names):
        raise MiniLoraError(f"adapter_names must be a list of adapter names, one per row; got {adapter_names!r}.")
    if model.training:
        raise MiniLoraError("Cannot pass `adapter_names` when the model is in training mode (dropout would differ "
                            "per group of rows): call model.eval() first.")
    known = set().union(*(layer.lora_A.keys() for layer in layers))
    unknown = sorted({name for name in adapter_names if name != BASE} - known)
    if unknown:
        raise MiniLoraError(f"Trying to infer with non-existing adapter(s): {', '.join(unknown)} (the model has "
                            f"{sorted(known)}; {BASE!r} means no adapter).")
    if any(layer.merged for layer in layers):
        raise MiniLoraError("Cannot pass `adapter_names` when there are merged adapters, please call "
                            "`unmerge_adapter` first.")
    encoder = _encoder(model) if encoder_adapter_names is not None else None
    in_encoder = {id(module) for module in encoder.modules()} if encoder is not None else set()

    def names_of(module: nn.Module) -> list[str]:
        return list(encoder_adapter_names if id(module) in in_encoder else adapter_names)

    previous = [layer.forward_override for layer in layers]
    wrappers = [wrapper for _, wrapper in saved_modules(model)]  # modules_to_save: each row its adapter's copy
    for layer in layers:
        names = names_of(layer)
        layer.forward_override = _MixedForward(row_groups(names), len(names))
    for wrapper in wrappers:
        wrapper.mixed_rows = row_groups(names_of(wrapper))
    try:
        yield model
    finally:
        for layer, override in zip(layers, previous):
            layer.forward_override = override
        for wrapper in wrappers:
            wrapper.mixed_rows = None


def _encoder(model: nn.Module) -> nn.Module | None:
    """The model's encoder (PEFT's ``_get_encoder``), or None: transformers 5 answers ``get_encoder()``
    with the model itself when it has none."""
    encoder = model.get_encoder() if hasattr(model, "get_encoder") else None
    return None if encoder is model else encoder


def row_groups(adapter_names: list[str]) -> dict[str, list[int]]:
    """{adapter: the rows that use it}, in order of first appearance."""
    rows: dict[str, list[int]] = {}
    for index, name in enumerate(adapter_names):
        rows.setdefault(name, []).append(index)
    return rows


class _MixedForward:
    """A LoraLinear's forward for a mixed batch (set as its ``forward_override`` by ``mixed_batch``)."""

    def __init__(self, rows: dict[str, list[int]], batch: int) -> None:
        self.rows, self.batch = rows, batch

    def __call__(self, layer: LoraLinear, x: torch.Tensor) -> torch.Tensor:
        if len(x) != self.batch:  # (checked first, even with the adapters switched off, as PEFT's)
            raise MiniLoraError(f"Length of `adapter_names` should be the same as the number of inputs, but got "
                                f"{self.batch} and {len(x)} respectively.")
        if layer.disabled:  # adapters switched off: the base model, as PEFT
            return layer.base_layer(x)
        result = layer.base_layer(x)                                   # (B, ..., out), every row
        result_dtype = result.dtype
        for adapter, rows in self.rows.items():
            if adapter == BASE or adapter not in layer.lora_A:
                continue
            sub_batch = x[rows].to(layer.lora_A[adapter].weight.dtype)  # (rows, ..., in), gathered
            result[rows] += layer.lora_update(sub_batch, adapter).to(result_dtype)
        return result
