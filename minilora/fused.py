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

      [x W0^T + b | x A^T] = x @ [W0^T | A^T] + [b | 0]      (N, in) @ (in, out + r) -> (N, out + r)

  The buffer is stored in W0's own layout (``[W0; A]`` rows for nn.Linear, ``[W0 | A^T]`` columns
  for Conv1D), so the big matmul is the base layer's own kernel with r more outputs; and B is
  stored as B^T's rows, the layout the accumulate reads.

Compiling (``torch.compile(model)``) works on top of any path; the benchmarks time it on the
reference path.

The concatenated weight, and why it cannot go stale
---------------------------------------------------
Selecting the fused path builds, per layer, one buffer that holds ``W0`` and ``A`` stacked, and
then makes ``W0``, its bias and ``A`` *views of that buffer*: no copy of any of them exists, so
whatever changes them in place (``merge``, ``load_state_dict``, an optimizer step, a write
through ``.data``) changes the buffer too. If one of them was *replaced* by another tensor
(``model.to(...)``, ``merge(safe=True)``, ``weight.data = ...``, ``copy.deepcopy``), the next
call sees that the buffer no longer backs it (``data_ptr``) and rebuilds the buffer from the
current values. Selecting another path gives each its own contiguous storage back and drops the
buffer. While fused, ``torch.save`` of ``lora_A`` alone would store the whole buffer (safetensors
stores just the view): select another path before saving with ``torch.save``.

Tolerances (checked in tests/test_fused.py against the reference path): float32 within 1e-5
relative (max |difference| / max |reference|), forward and gradients. bfloat16 base weights:
within 3e-2, about what bfloat16 rounding alone moves a model's logits by; the fused path rounds
``x A^T`` and ``B`` to bfloat16 before accumulating, where the reference adds in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import MiniLoraError
from .inject import require_lora_layers
from .layer import LoraLinear

FORWARD_PATHS = ("reference", "merged", "fused")


def set_forward_path(model: nn.Module, path: str, concatenate: bool = True) -> nn.Module:
    """Make every LoRA layer of ``model`` compute its output the way ``path`` says; returns ``model``.

    Args:
        model: a model with minilora layers (``minilora.inject``).
        path: ``"reference"`` (PEFT's op order; the default after ``inject``), ``"merged"``
            (``W0 + s B A`` folded in: ``minilora.merge``) or ``"fused"`` (see the module
            docstring). Leaving ``"merged"`` unmerges.
        concatenate: fused path only: without gradients, one matmul over the concatenated
            weight ``[W0; A]``. False: the base matmul, ``x A^T`` and ``addmm_`` as in training
            (no buffer). Which is faster where: benchmarks/results/latest.md.

    Raises:
        MiniLoraError: before changing anything, if ``path`` is unknown or the model has no
            LoRA layers.
    """
    if path not in FORWARD_PATHS:
        hint = " For torch.compile, compile the model on any path: torch.compile(model)." \
            if path == "compiled" else ""
        raise MiniLoraError(f"Unknown forward path {path!r}; choose one of {FORWARD_PATHS}.{hint}")
    layers = [layer for _, layer in require_lora_layers(model, "set_forward_path")]
    if path == "fused" and concatenate and _sharded(layers):
        raise MiniLoraError(
            "The model is sharded (FSDP2's fully_shard: its parameters are DTensors). The concatenated weight "
            "[W0; A] would re-point FSDP's unsharded parameters and train wrong; use "
            "set_forward_path(model, 'fused', concatenate=False), which adds the update in place without it."
        )
    for layer in layers:
        release_concatenated_weight(layer)
        store_B(layer, transposed=False)
        layer.forward_override = None
        if path == "merged" and not layer.merged:
            layer.merge()
        elif path != "merged" and layer.merged:
            layer.unmerge()
        if path == "fused":
            layer.fused_concatenate = bool(concatenate)
            if concatenate:
                build_concatenated_weight(layer)
            store_B(layer, transposed=True)
            layer.forward_override = fused_forward
    return model


def _sharded(layers: list[LoraLinear]) -> bool:
    """True if any parameter of these layers is a DTensor (FSDP2, tensor parallelism)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return any(isinstance(param, DTensor) for layer in layers for param in layer.parameters())


def forward_path(model: nn.Module) -> str:
    """The path the model's LoRA layers use: one of FORWARD_PATHS, or "mixed" if they differ."""
    paths = {_layer_path(layer) for _, layer in require_lora_layers(model, "forward_path")}
    return paths.pop() if len(paths) == 1 else "mixed"


def store_B(layer: LoraLinear, transposed: bool) -> None:
    """Keep every B (out, r) in memory as B^T's rows (``transposed``), or in its own layout.

    The fused path's ``addmm_`` reads ``B^T`` (r, out). Stored as B's own rows, that is ``out``
    dot products of length r; stored as B^T's rows, r rows of ``out`` scaled and added, which
    measured about 2x faster per call at one token on a 2-core CPU. B keeps its shape, values
    and identity; only its strides change ((1, out) instead of (r, 1)).
    """
    with torch.inference_mode(False), torch.no_grad():
        for adapter in layer.lora_B.values():
            weight = adapter.weight
            if transposed and not weight.T.is_contiguous():
                weight.data = weight.data.T.contiguous().T   # (out, r) with strides (1, out)
            elif not transposed and not weight.is_contiguous():
                weight.data = weight.data.contiguous()


def _layer_path(layer: LoraLinear) -> str:
    if layer.forward_override is fused_forward:
        return "fused"
    return "merged" if layer.merged else "reference"


# ------------------------------------------------------------------------------------------------
# The concatenated weight [W0; A] (nn.Linear) or [W0 | A^T] (Conv1D)
# ------------------------------------------------------------------------------------------------
def build_concatenated_weight(layer: LoraLinear) -> None:
    """Stack W0 and A in one buffer in W0's own layout, and make W0, its bias and A views of it.

    nn.Linear stores W0 as (out, in): the buffer is (out + r, in) = [W0; A], W0 its first ``out``
    rows and A the last r, and ``F.linear(x, buffer)`` gives ``[x W0^T | x A^T]``. Conv1D stores
    W0 as (in, out): the buffer is (in, out + r) = [W0 | A^T], W0 its first ``out`` columns and A
    the transpose of the last r, and ``addmm(b, x, buffer)`` gives the same. Keeping W0's layout
    keeps the base matmul the kernel it was: stacked as (out + r, in) rows instead, a Conv1D's
    one-token matmul (decode) ran 1.2-1.7x slower on a 2-core CPU (benchmarks/results/latest.md).
    Skipped (nothing built) unless exactly one adapter is active, and while A's dtype differs from
    W0's (a half-precision base with a float32 adapter).
    """
    active = _active(layer)
    if len(active) != 1 or layer.lora_A[active[0]].weight.dtype != layer.base_layer.weight.dtype:
        layer._concatenated = None
        return
    base, adapter = layer.base_layer, layer.lora_A[active[0]]
    out = layer.out_features
    with torch.inference_mode(False), torch.no_grad():  # normal tensors even if called under inference_mode
        if layer.fan_in_fan_out:  # Conv1D
            buffer = torch.cat([base.weight, adapter.weight.T], dim=1)  # (in, out + r) = [W0 | A^T]
        else:                     # nn.Linear
            buffer = torch.cat([base.weight, adapter.weight])           # (out + r, in) = [W0; A]
        base.weight.data, adapter.weight.data = split_concatenated(layer, buffer)  # views of the buffer
        bias_buffer = None
        if base.bias is not None:
            bias_buffer = torch.cat([base.bias, base.bias.new_zeros(adapter.weight.shape[0])])  # (out + r,) = [b | 0]
            base.bias.data = bias_buffer[:out]
    layer._concatenated = (buffer, bias_buffer, _storage_pointers(layer))


def split_concatenated(layer: LoraLinear, buffer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W0 and A as views of a concatenated buffer, in W0's layout: ((out, in) or (in, out), (r, in))."""
    out = layer.out_features
    if layer.fan_in_fan_out:                 # buffer (in, out + r) = [W0 | A^T]
        return buffer[:, :out], buffer[:, out:].T
    return buffer[:out], buffer[out:]        # buffer (out + r, in) = [W0; A]


def _active(layer: LoraLinear) -> list[str]:
    """The layer's active adapters that it holds."""
    return [name for name in layer.active_adapters if name in layer.lora_A]


def _storage_pointers(layer: LoraLinear) -> tuple:
    """Which adapter, and where W0, its A and the bias live now: equal to the values at build time
    iff still views of the buffer (and the same single adapter is active)."""
    bias = layer.base_layer.bias
    active = _active(layer)
    a_pointer = layer.lora_A[active[0]].weight.data_ptr() if len(active) == 1 else 0
    return (tuple(active), layer.base_layer.weight.data_ptr(), a_pointer, bias.data_ptr() if bias is not None else 0)


def release_concatenated_weight(layer: LoraLinear) -> None:
    """Give W0, its bias and A their own contiguous storage back and drop the buffer, if there is one."""
    built = getattr(layer, "_concatenated", None)
    if built is None:
        return
    adapters = [layer.lora_A[name] for name in built[2][0] if name in layer.lora_A]  # the one it was built for
    tensors = [layer.base_layer.weight, layer.base_layer.bias, *(adapter.weight for adapter in adapters)]
    with torch.inference_mode(False), torch.no_grad():
        for tensor in tensors:
            if tensor is not None:
                tensor.data = tensor.data.clone(memory_format=torch.contiguous_format)
    layer._concatenated = None


def _concatenated_weight(layer: LoraLinear) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The buffer and its bias; rebuilt first if W0, its bias or A was replaced by another tensor."""
    built = getattr(layer, "_concatenated", None)
    if built is None or built[2] != _storage_pointers(layer):
        release_concatenated_weight(layer)  # (a no-op if their storage is already their own)
        build_concatenated_weight(layer)
        built = layer._concatenated
    return (built[0], built[1]) if built is not None else (None, None)


# ------------------------------------------------------------------------------------------------
# The fused forward
# ------------------------------------------------------------------------------------------------
def base_matmul(layer: LoraLinear, x2d: torch.Tensor) -> torch.Tensor:
    """W0 x + b for rows x2d (N, in) -> (N, out), a new tensor (never a view), in each layout."""
    weight, bias = layer.base_layer.weight, layer.base_layer.bias
    if layer.fan_in_fan_out:  # Conv1D: weight (in, out); out = b + x W
        return torch.addmm(bias, x2d, weight) if bias is not None else x2d @ weight
    return F.linear(x2d, weight, bias)  # nn.Linear: weight (out, in); out = x W^T + b


def concatenated_matmul(layer: LoraLinear, x2d: torch.Tensor, buffer: torch.Tensor,
                        bias_buffer: torch.Tensor | None) -> torch.Tensor:
    """[x W0^T + b | x A^T] for rows x2d (N, in) -> (N, out + r), in the buffer's layout."""
    if layer.fan_in_fan_out:  # buffer (in, out + r): x @ buffer + [b | 0]
        return torch.addmm(bias_buffer, x2d, buffer) if bias_buffer is not None else x2d @ buffer
    return F.linear(x2d, buffer, bias_buffer)  # buffer (out + r, in): x @ buffer^T + [b | 0]


def fused_forward(layer: LoraLinear, x: torch.Tensor) -> torch.Tensor:
    """h = W0 x + b + s * B A dropout(x), with the update added into the base output in place.

    Gradients flow as in the reference path: ``addmm_`` is an ordinary autograd op whose backward
    needs ``x A^T`` and ``B`` only (no output-sized tensor is saved or made).
    """
    if layer.merged or layer.disabled:
        return layer.base_layer(x)
    adapters = _active(layer)  # usually one; each active adapter adds its own update
    lead_shape = x.shape[:-1]
    x2d = x.reshape(-1, layer.in_features)                           # (N, in)
    dropout_active = layer.training and any(isinstance(layer.lora_dropout[a], nn.Dropout) for a in adapters)
    bias = layer.base_layer.bias
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or layer.base_layer.weight.requires_grad or (bias is not None and bias.requires_grad)
        or any(p.requires_grad for a in adapters for p in (layer.lora_A[a].weight, layer.lora_B[a].weight)))
    same_dtype = all(layer.lora_A[a].weight.dtype == layer.base_layer.weight.dtype for a in adapters)

    if len(adapters) == 1 and not needs_grad and not dropout_active and same_dtype \
            and getattr(layer, "fused_concatenate", True):
        buffer, bias_buffer = _concatenated_weight(layer)
        weight_B, scaling = layer.lora_B[adapters[0]].weight, layer.scaling[adapters[0]]  # (out, r)
        both = concatenated_matmul(layer, x2d, buffer, bias_buffer)  # (N, in) -> (N, out + r)
        out2d, xa = both[:, :layer.out_features], both[:, layer.out_features:]  # (N, out), (N, r)
        out2d.addmm_(xa, weight_B.T, alpha=scaling)          # (N, out) += s (N, r) @ (r, out)
        return out2d.view(*lead_shape, layer.out_features)

    out2d = base_matmul(layer, x2d)                                  # (N, out)
    for adapter in adapters:
        weight_A, weight_B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight  # (r, in), (out, r)
        same = weight_A.dtype == out2d.dtype
        x_adapter = x2d if same else x2d.to(weight_A.dtype)          # half base, float32 adapter
        xa = F.linear(layer.lora_dropout[adapter](x_adapter), weight_A)  # (N, in) @ (in, r) -> (N, r)
        if not same:
            xa, weight_B = xa.to(out2d.dtype), weight_B.to(out2d.dtype)
        out2d.addmm_(xa, weight_B.T, alpha=layer.scaling[adapter])   # (N, out) += s (N, r) @ (r, out)
    return out2d.view(*lead_shape, layer.out_features)
