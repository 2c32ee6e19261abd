"""What an adapter changes: the size and the rank of dW = scaling * B A, layer by layer.

For each LoRA layer (the numbers ``minilora diff`` prints):

- relative change ``||dW||_F / ||W0||_F``: how big the update is next to the frozen weight
  (Frobenius norms, ``||M||_F = sqrt(sum of squared entries) = sqrt(sum_i s_i^2)``).
- rank: the number of singular values ``s_i`` of dW with ``s_i > rtol * s_1`` (``s_1`` the largest;
  ``rtol`` = 0.01 by default). dW = B A can never have rank above r.
- effective rank (Roy & Vetterli, 2007): ``exp(H(p))`` with ``p_i = s_i / sum_j s_j`` and
  ``H(p) = -sum_i p_i log p_i``. It is k when dW has k equal singular values and the rest zero, and
  falls smoothly towards 1 as one direction dominates: a rank that counts how spread the update is.
  0 for dW = 0 (a fresh adapter, whose B is zero).

The singular values come from the small factors, not from the (out, in) matrix: with the thin QR
decompositions ``B = Q_B R_B`` and ``A^T = Q_A R_A``, ``B A = Q_B (R_B R_A^T) Q_A^T``, and Q_B, Q_A
have orthonormal columns, so dW has the singular values of the (r, r) matrix ``scaling * R_B R_A^T``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .inject import lora_layers
from .layer import LoraLinear

DEFAULT_RTOL = 0.01


class LayerChange(NamedTuple):
    """One LoRA layer's update, summarised."""

    name: str
    r: int
    delta_norm: float      # ||dW||_F
    base_norm: float       # ||W0||_F
    relative: float        # ||dW||_F / ||W0||_F
    rank: int              # singular values above rtol * the largest
    effective_rank: float  # exp(entropy of the normalised singular values)
    singular_values: torch.Tensor  # (r,), float64, descending


def delta_singular_values(layer: LoraLinear, adapter: str | None = None) -> torch.Tensor:
    """The r singular values of ``dW = scaling * B A``, descending, in float64, from (r, r) matrices.

    ``adapter``: whose dW; None means the layer's one active adapter.
    """
    adapter = layer.active_adapter if adapter is None else adapter
    weight_A = layer.lora_A[adapter].weight.detach().double()  # (r, in)
    weight_B = layer.lora_B[adapter].weight.detach().double()  # (out, r)
    _, r_B = torch.linalg.qr(weight_B)                # B = Q_B R_B, R_B: (r, r)
    _, r_A = torch.linalg.qr(weight_A.T)              # A^T = Q_A R_A, R_A: (r, r)
    core = r_B @ r_A.T                                # (r, r) @ (r, r) -> (r, r)
    return torch.linalg.svdvals(core) * abs(layer.scaling[adapter])


def numerical_rank(singular_values: torch.Tensor, rtol: float = DEFAULT_RTOL) -> int:
    """How many singular values exceed ``rtol`` times the largest (0 for a zero matrix)."""
    largest = singular_values.max().item() if singular_values.numel() else 0.0
    if largest == 0.0:
        return 0
    return int((singular_values > rtol * largest).sum().item())


def effective_rank(singular_values: torch.Tensor) -> float:
    """Roy & Vetterli's effective rank ``exp(-sum p_i log p_i)``, ``p_i = s_i / sum s``; 0 for all-zero."""
    total = singular_values.sum().item()
    if total == 0.0:
        return 0.0
    p = singular_values[singular_values > 0] / total
    return float(torch.exp(-(p * p.log()).sum()).item())


def layer_changes(model: nn.Module, rtol: float = DEFAULT_RTOL) -> list[LayerChange]:
    """One ``LayerChange`` per LoRA layer of ``model``, in module order."""
    rows = []
    for name, layer in lora_layers(model):
        singular_values = delta_singular_values(layer)
        base_weight = layer.base_layer.weight.detach().double()
        for adapter in layer.merged_adapters:  # W0 currently holds W0 + dW
            base_weight = base_weight - layer.delta_weight(adapter).detach().double()
        delta_norm = float(singular_values.square().sum().sqrt())
        base_norm = float(torch.linalg.matrix_norm(base_weight))  # Frobenius
        rows.append(LayerChange(
            name=name,
            r=layer.r[layer.active_adapter],
            delta_norm=delta_norm,
            base_norm=base_norm,
            relative=delta_norm / base_norm if base_norm else float("inf"),
            rank=numerical_rank(singular_values, rtol),
            effective_rank=effective_rank(singular_values),
            singular_values=singular_values,
        ))
    return rows


def change_table(rows: list[LayerChange]) -> str:
    """The rows as an aligned text table."""
    header = ("layer", "r", "||dW||_F", "||W0||_F", "||dW||/||W0||", "rank", "eff. rank")
    cells = [header] + [
        (row.name, str(row.r), f"{row.delta_norm:.4f}", f"{row.base_norm:.4f}", f"{row.relative:.3e}",
         str(row.rank), f"{row.effective_rank:.2f}")
        for row in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = []
    for i, row in enumerate(cells):
        lines.append("  ".join(v.ljust(w) if j == 0 else v.rjust(w) for j, (v, w) in enumerate(zip(row, widths))))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot_changes(rows: list[LayerChange], path: str) -> None:
    """Save a PNG: the relative change per layer (top) and the rank and effective rank (bottom)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no window
    import matplotlib.pyplot as plt

    positions = range(len(rows))
    labels = [row.name.replace("transformer.", "") for row in rows]
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(max(6, 0.5 * len(rows) + 2), 6), sharex=True)
    top.bar(positions, [row.relative for row in rows], color="tab:blue")
    top.set_ylabel("||dW||_F / ||W0||_F")
    top.set_title("What the adapter changes, layer by layer")
    bottom.bar(positions, [row.rank for row in rows], color="tab:gray", label="rank")
    bottom.bar(positions, [row.effective_rank for row in rows], color="tab:orange", width=0.5,
               label="effective rank")
    r = max(row.r for row in rows)
    bottom.axhline(r, color="black", linewidth=0.8, linestyle="--", label="r")
    bottom.set_ylim(0, 1.4 * r)  # room for the legend above the bars
    bottom.set_ylabel("rank of dW")
    bottom.legend(loc="upper right", ncol=3)
    bottom.set_xticks(list(positions), labels, rotation=60, ha="right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
