"""Counting parameters: what LoRA trains, layer by layer and in total.

A LoRA layer on a weight of shape (out, in) adds ``r * in`` numbers in A and ``r * out`` in B:
``r * (in + out)`` in all, against ``in * out`` for the full weight. For GPT-2 small with r=8 on
``c_attn`` (in 768, out 2304) in each of the 12 blocks: 12 * 8 * (768 + 2304) = 294,912.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import nn

from .inject import lora_layers


class ParameterCount(NamedTuple):
    """``trainable, total = count_parameters(model)``; ``.percent`` is 100 * trainable / total."""

    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100 * self.trainable / self.total if self.total else 0.0


class LayerCount(NamedTuple):
    """One adapter of one LoRA layer: its shape, its rank, and the parameters it adds, by formula and by counting."""

    name: str          # the layer's name, followed by " [adapter]" when the layer holds several
    kind: str          # "Linear" or "Conv1D"
    in_features: int
    out_features: int
    r: int
    theory: int        # r * (in + out), + out for B's bias with lora_bias
    counted: int       # numel of lora_A + lora_B (its bias included)


def count_parameters(model: nn.Module) -> ParameterCount:
    """Trainable and total parameters, as PEFT's ``get_nb_trainable_parameters`` counts them.

    ``model.parameters()`` yields a shared (tied) tensor once: GPT-2's lm_head and wte count once.
    """
    trainable = total = 0
    for param in model.parameters():
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    return ParameterCount(trainable, total)


def trainable_parameters_line(model: nn.Module) -> str:
    """PEFT's line: ``trainable params: 294,912 || all params: 124,734,720 || trainable%: 0.2364``."""
    count = count_parameters(model)
    return (
        f"trainable params: {count.trainable:,d} || all params: {count.total:,d} "
        f"|| trainable%: {count.percent:.4f}"
    )


def print_trainable_parameters(model: nn.Module) -> None:
    """Print ``trainable_parameters_line(model)``, exactly as PEFT prints it."""
    print(trainable_parameters_line(model))


def layer_counts(model: nn.Module) -> list[LayerCount]:
    """One row per LoRA layer and adapter; the ``counted`` column sums to the LoRA parameters of the model
    (its trainable part when every adapter trains)."""
    rows = []
    for name, layer in lora_layers(model):
        for adapter in layer.lora_A:
            rows.append(LayerCount(
                name=name if len(layer.lora_A) == 1 else f"{name} [{adapter}]",
                kind=type(layer.base_layer).__name__ if layer.fan_in_fan_out else "Linear",
                in_features=layer.in_features,
                out_features=layer.out_features,
                r=layer.r[adapter],
                theory=layer.r[adapter] * (layer.in_features + layer.out_features)
                + (layer.out_features if layer.lora_bias[adapter] else 0),
                counted=sum(p.numel() for m in (layer.lora_A[adapter], layer.lora_B[adapter]) for p in m.parameters()),
            ))
    return rows


def layer_table(model: nn.Module) -> str:
    """The per-layer breakdown as an aligned text table, with a total row."""
    rows = layer_counts(model)
    header = ("layer", "kind", "in", "out", "r", "r*(in+out)", "counted")
    lines = [(row.name, row.kind, row.in_features, row.out_features, row.r, row.theory, row.counted) for row in rows]
    lines.append(("total", "", "", "", "", sum(r.theory for r in rows), sum(r.counted for r in rows)))
    cells = [header] + [tuple(f"{v:,}" if isinstance(v, int) else v for v in line) for line in lines]
    widths = [max(len(str(row[i])) for row in cells) for i in range(len(header))]
    out = []
    for i, row in enumerate(cells):
        out.append("  ".join(str(v).ljust(w) if j < 2 else str(v).rjust(w) for j, (v, w) in enumerate(zip(row, widths))))
        if i == 0 or i == len(cells) - 2:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)
