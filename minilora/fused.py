"""Other ways to compute the same LoRA layer, chosen per model with ``set_forward_path``.

Every path computes ``h = W0 x + b + s * B A x`` (``s = scaling``); they differ in how many
matmuls run and how many output-sized tensors are made on the way.

- ``"reference"`` (the default): ``base_layer(x) + s * lora_B(lora_A(dropout(x)))`` in PEFT's
  op order (``LoraLinear.forward``). Five ops after the base matmul, three of which write a new
  (N, out) tensor: ``B(A x)``, ``* s`` and ``+``. This path is bitwise equal to PEFT.
- ``"merged"``: ``W0 <- W0 + s B A`` (``minilora.merge``); one matmul, the base layer's cost.
  Cannot train (A and B no longer take part) and needs ``unmerge`` before the adapter changes.
- ``"fused"``: the update is accumulated into the base output in place, with no output-sized
  temporaries: ``out.addmm_(x A^T, B^T, alpha=s)``. When no gradient is needed (inference, eval
  or p = 0 dropout) the base matmul and ``x A^T`` are one matmul over a concatenated weight,
  so decoding pays one big matmul per layer and one small accumulate:

      [x W0 + b | x A^T] = x [W0 | A^T] + [b | 0]      (N, in) @ (in, out + r) -> (N, out + r)

Compiling (``torch.compile(model)``) works on top of any path; the benchmarks time it on the
reference path.

The concatenated weight, and why it cannot go stale
---------------------------------------------------
Selecting the fused path builds, per layer, one buffer that holds ``W0`` and ``A`` side by side,
and then makes ``W0`` (and its bias) *views of that buffer*: no copy of ``W0`` exists, so
whatever changes ``W0`` in place (``merge``, ``load_state_dict``, an optimizer) changes the
buffer too. ``A`` is small (r x in) and trains, so it is copied into the buffer on every call
that uses the buffer. If ``W0`` or its bias was *replaced* by another tensor (``model.to(...)``,
``merge(safe=True)``, ``weight.data = ...``), the next call sees that the buffer no longer backs
them (``data_ptr``) and rebuilds it. Selecting another path gives ``W0`` its own contiguous
storage back and drops the buffer.

Tolerances (checked in tests/test_fused.py against the reference path): float32 within 1e-5
relative (max |difference| / max |reference|), forward and gradients; bfloat16 base weights
within 2e-2, because the fused path rounds ``x A^T`` and ``B`` to bfloat16 before accumulating
where the reference adds the update in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import MiniLoraError
from .inject import lora_layers
from .layer import LoraLinear

FORWARD_PATHS = ("reference", "merged", "fused")


def set_forward_path(model: nn.Module, path: str) -> nn.Module:
    """Make every LoRA layer of ``model`` compute its output the way ``path`` says; returns ``model``.

    Args:
        model: a model with minilora layers (``minilora.inject``).
        path: ``"reference"`` (PEFT's op order; the default after ``inject``), ``"merged"``
            (``W0 + s B A`` folded in: ``minilora.merge``) or ``"fused"`` (see the module
            docstring). Leaving ``"merged"`` unmerges.

    Raises:
        MiniLoraError: before changing anything, if ``path`` is unknown or the model has no
            LoRA layers.
    """
    if path not in FORWARD_PATHS:
        hint = " For torch.compile, compile the model on any path: torch.compile(model)." \
            if path == "compiled" else ""
        raise MiniLoraError(f"Unknown forward path {path!r}; choose one of {FORWARD_PATHS}.{hint}")
    layers = [layer for _, layer in lora_layers(model)]
    if not layers:
        raise MiniLoraError("set_forward_path: this model has no minilora layers. "
                            "Call minilora.inject(model, config) first.")
    for layer in layers:
        release_concatenated_weight(layer)
        layer.forward_override = None
        if path == "merged" and not layer.merged:
            layer.merge()
        elif path != "merged" and layer.merged:
            layer.unmerge()
        if path == "fused":
            build_concatenated_weight(layer)
            layer.forward_override = fused_forward
    return model


def forward_path(model: nn.Module) -> str:
    """The path the model's LoRA layers use: one of FORWARD_PATHS, or "mixed" if they differ."""
    paths = {_layer_path(layer) for _, layer in lora_layers(model)}
    if not paths:
        raise MiniLoraError("forward_path: this model has no minilora layers.")
    return paths.pop() if len(paths) == 1 else "mixed"


def _layer_path(layer: LoraLinear) -> str:
    if layer.forward_override is fused_forward:
        return "fused"
    return "merged" if layer.merged else "reference"


# ------------------------------------------------------------------------------------------------
# The concatenated weight [W0 | A^T]
# ------------------------------------------------------------------------------------------------
def build_concatenated_weight(layer: LoraLinear) -> None:
    """Put W0 and A side by side in one buffer and make W0 (and its bias) views of it.

    nn.Linear stores W0 as (out, in): the buffer is (out + r, in) = [W0; A], and the product is
    ``x @ buffer^T``. Conv1D stores W0 as (in, out): the buffer is (in, out + r) = [W0 | A^T], and
    the product is ``x @ buffer``. Either way W0 keeps its layout (for Conv1D its rows get r more
    entries of stride), so the base layer still works on it unchanged.
    """
    base = layer.base_layer
    weight, bias, out = base.weight, base.bias, layer.out_features
    with torch.inference_mode(False), torch.no_grad():  # normal tensors even if called under inference_mode
        if layer.fan_in_fan_out:
            buffer = torch.cat([weight, layer.lora_A.weight.T.to(weight.dtype)], dim=1)  # (in, out + r)
            weight.data = buffer[:, :out]                                                # (in, out), a view
        else:
            buffer = torch.cat([weight, layer.lora_A.weight.to(weight.dtype)], dim=0)    # (out + r, in)
            weight.data = buffer[:out]                                                   # (out, in), a view
        bias_buffer = None
        if bias is not None:
            bias_buffer = torch.cat([bias, bias.new_zeros(layer.r)])                     # (out + r,) = [b | 0]
            bias.data = bias_buffer[:out]
    layer._concatenated = (buffer, bias_buffer)


def release_concatenated_weight(layer: LoraLinear) -> None:
    """Give W0 and its bias their own contiguous storage back and drop the buffer, if there is one."""
    if getattr(layer, "_concatenated", None) is None:
        return
    base = layer.base_layer
    with torch.inference_mode(False), torch.no_grad():
        base.weight.data = base.weight.data.clone(memory_format=torch.contiguous_format)
        if base.bias is not None:
            base.bias.data = base.bias.data.clone()
    layer._concatenated = None


def _concatenated_weight(layer: LoraLinear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The buffer with the current A copied in; rebuilt first if W0 or its bias was replaced."""
    buffer, bias_buffer = getattr(layer, "_concatenated", None) or (None, None)
    base = layer.base_layer
    stale = buffer is None or base.weight.data_ptr() != buffer.data_ptr() or (
        base.bias is not None and (bias_buffer is None or base.bias.data_ptr() != bias_buffer.data_ptr()))
    if stale:
        build_concatenated_weight(layer)
        buffer, bias_buffer = layer._concatenated
    out = layer.out_features
    with torch.no_grad():
        if layer.fan_in_fan_out:
            buffer[:, out:].copy_(layer.lora_A.weight.T)  # (in, r) <- A^T
        else:
            buffer[out:].copy_(layer.lora_A.weight)       # (r, in) <- A
    return buffer, bias_buffer


# ------------------------------------------------------------------------------------------------
# The fused forward
# ------------------------------------------------------------------------------------------------
def base_matmul(layer: LoraLinear, x2d: torch.Tensor) -> torch.Tensor:
    """W0 x + b for rows x2d (N, in) -> (N, out), a new tensor (never a view), in each layout."""
    weight, bias = layer.base_layer.weight, layer.base_layer.bias
    if layer.fan_in_fan_out:  # Conv1D: weight (in, out); out = b + x W
        return torch.addmm(bias, x2d, weight) if bias is not None else x2d @ weight
    return F.linear(x2d, weight, bias)  # nn.Linear: weight (out, in); out = x W^T + b


def fused_forward(layer: LoraLinear, x: torch.Tensor) -> torch.Tensor:
    """h = W0 x + b + s * B A dropout(x), with the update added into the base output in place.

    Gradients flow as in the reference path: ``addmm_`` is an ordinary autograd op whose backward
    needs ``x A^T`` and ``B`` only (no output-sized tensor is saved or made).
    """
    if layer.merged or layer.disabled:
        return layer.base_layer(x)
    weight_A, weight_B = layer.lora_A.weight, layer.lora_B.weight  # (r, in), (out, r)
    lead_shape = x.shape[:-1]
    x2d = x.reshape(-1, layer.in_features)                           # (N, in)
    dropout_active = layer.training and isinstance(layer.lora_dropout, nn.Dropout)
    bias = layer.base_layer.bias
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or weight_A.requires_grad or weight_B.requires_grad
        or layer.base_layer.weight.requires_grad or (bias is not None and bias.requires_grad))
    same_dtype = weight_A.dtype == layer.base_layer.weight.dtype

    if not needs_grad and not dropout_active and same_dtype:
        buffer, bias_buffer = _concatenated_weight(layer)
        if layer.fan_in_fan_out:   # [x W0 + b | x A^T]: (N, in) @ (in, out + r) -> (N, out + r)
            both = torch.addmm(bias_buffer, x2d, buffer) if bias_buffer is not None else x2d @ buffer
        else:                      # (N, in) @ (in, out + r), the buffer being (out + r, in)
            both = F.linear(x2d, buffer, bias_buffer)
        out2d, xa = both[:, :layer.out_features], both[:, layer.out_features:]  # (N, out), (N, r)
        out2d.addmm_(xa, weight_B.T, alpha=layer.scaling)            # (N, out) += s (N, r) @ (r, out)
        return out2d.view(*lead_shape, layer.out_features)

    out2d = base_matmul(layer, x2d)                                  # (N, out)
    x_adapter = x2d if same_dtype else x2d.to(weight_A.dtype)        # half base, float32 adapter
    xa = F.linear(layer.lora_dropout(x_adapter), weight_A)           # (N, in) @ (in, r) -> (N, r)
    if not same_dtype:
        xa, weight_B = xa.to(out2d.dtype), weight_B.to(out2d.dtype)
    out2d.addmm_(xa, weight_B.T, alpha=layer.scaling)                # (N, out) += s (N, r) @ (r, out)
    return out2d.view(*lead_shape, layer.out_features)
