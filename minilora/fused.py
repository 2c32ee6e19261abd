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

      [h | xa] = x @ [W0^T | A^T] + [b | 0]      (N, in) @ (in, out + r) -> (N, out + r)
      h += s * xa @ B^T                          (N, out) += (N, r) @ (r, out), in place

  The buffer is stored in W0's own layout (``[W0; A]`` rows for nn.Linear, ``[W0 | A^T]`` columns
  for Conv1D), so the big matmul is the base layer's own kernel with r more outputs; and B is
  stored as B^T's rows, the layout the accumulate reads. Beyond the base layer's own ops that is
  two: ``split_with_sizes`` (two views) and ``addmm_``. At one token on a CPU the matmuls take
  microseconds and Python's per-op cost is of the same size, so everything a call needs is
  looked up once (``Concatenated``) and each call only checks that it is still current, reading
  what it holds rather than walking the modules again: in a GPT-2 decode step that walk, whose
  memory the weights' stream evicts between two calls, had cost ~1.5% of the step.

Compiling (``torch.compile(model)``) works on top of any path; the benchmarks time it on the
reference path.

The concatenated weight, and why it cannot go stale
---------------------------------------------------
Selecting the fused path builds, per layer, one buffer that holds ``W0`` and ``A`` stacked, and
then makes ``W0``, its bias and ``A`` *views of that buffer*: no copy of any of them exists, so
whatever changes them in place (``merge``, ``load_state_dict``, an optimizer step, a write
through ``.data``) changes the buffer too. If one of them was *replaced* by another tensor
(``model.to(...)``, ``merge(safe=True)``, ``weight.data = ...``, ``copy.deepcopy``), or another
Parameter or module was put in its place (``setattr``, ``ModuleDict[name] = ...``, a write into
``_parameters`` as accelerate does), the next call sees it (``_is_current``: the dict entries and
data pointers it was built from) and rebuilds the buffer from the current values. A copy of the
model (``copy.deepcopy``, pickling) builds its own. Selecting another path gives each its own
contiguous storage back and drops the buffer. While fused, ``torch.save`` of ``lora_A`` alone
would store the whole buffer (safetensors stores just the view): select another path before
saving with ``torch.save``.

Hooks: PEFT's layer calls ``base_layer``, ``lora_A``, ``lora_B`` and the dropout as modules, so
hooks on them (a steering hook, accelerate's offloading) act on what they compute. The fused path
calls none of them; while one of them has a hook, it computes the reference way instead
(``_hooked``). Global hooks (``torch.nn.modules.module.register_module_forward_hook``) are not
looked at: with one registered, select the reference path.

Tolerances (checked in tests/test_fused.py against the reference path): float32 within 1e-5
relative (max |difference| / max |reference|), forward and gradients. bfloat16 base weights:
within 3e-2, about what bfloat16 rounding alone moves a model's logits by; the fused path rounds
``x A^T`` and ``B`` to bfloat16 before accumulating, where the reference adds in float32.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import addmm, is_grad_enabled, nn

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
            (no buffer). Which is faster where: the pages in benchmarks/results/ (README: benchmarks).

    Raises:
        MiniLoraError: before changing anything, if ``path`` is unknown or the model has no
            LoRA layers.
    """
    if path not in FORWARD_PATHS:
        hint = " For torch.compile, compile the model on any path: torch.compile(model)." \
            if path == "compiled" else ""
        raise MiniLoraError(f"Unknown forward path {path!r}; choose one of {FORWARD_PATHS}.{hint}")
    layers = [layer for _, layer in require_lora_layers(model, "set_forward_path")]
    if path == "fused" and any(layer.lora_bias[adapter] for layer in layers for adapter in _active(layer)):
        raise MiniLoraError(_LORA_BIAS_REFUSAL)
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


# The fused paths add s * B A x only; B's bias (lora_bias) would be left out.
_LORA_BIAS_REFUSAL = ("The fused forward path does not add lora_B's bias (lora_bias=True): it would give other outputs "
                      "than the reference path. Use set_forward_path(model, 'reference') (or 'merged').")


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
class Concatenated(NamedTuple):
    """One layer's concatenated weight and what its no-grad forward reads, built once per layer.

    Its readers unpack it as a tuple (``right, bias, ... = built``) rather than reading fields by
    name: see ``fused_forward`` for why."""

    # what the forward reads (concatenated_forward)
    right: torch.Tensor              # (in, out + r) = [W0^T | A^T], what x is multiplied by: the buffer or its .T (a view)
    bias: torch.Tensor | None        # (out + r,) = [b | 0], or None if the base layer has no bias
    B_T: torch.Tensor                # (r, out): a view of lora_B's weight (B^T, the layout addmm_ reads)
    sizes: tuple[int, int]           # (out, r): how the (N, out + r) output splits
    adapter: str                     # the one active adapter it was built for
    # what tells whether it is still current (_is_current)
    registered: tuple[tuple[dict, str, object], ...]  # (dict, key, what it held at build time)
    parameters: tuple[torch.Tensor, ...]  # W0, b (or None), A, B: the Parameters it was built from
    pointers: tuple[int, ...]        # where their data lived at build time (data_ptr; 0 for no bias)
    hooks: tuple[dict, ...]          # the forward (pre-)hooks of the modules the fused call does not call
    buffer: torch.Tensor             # (in, out + r) = [W0 | A^T] (Conv1D) or (out + r, in) = [W0; A] (nn.Linear)

    # A copy (copy.deepcopy, pickle) gives each weight storage of its own, and its pointers would name
    # this process's memory: a copy of the layer gets None instead and builds its own on its first call.
    def __deepcopy__(self, memo: dict) -> None:
        return None

    def __reduce__(self):
        return _no_concatenated, ()


def _no_concatenated() -> None:
    return None


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
    name = active[0]
    base, adapter = layer.base_layer, layer.lora_A[name]
    out = layer.out_features
    store_B(layer, transposed=True)  # (a no-op unless B was replaced since set_forward_path)
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
        B_T = layer.lora_B[name].weight.detach().T                       # (r, out), a view (no autograd)
    right = buffer if layer.fan_in_fan_out else buffer.T
    parameters = weights(layer, name)
    layer._concatenated = Concatenated(
        right=right, bias=bias_buffer, B_T=B_T, sizes=(out, adapter.weight.shape[0]), adapter=name,
        registered=_registrations(layer, name, parameters), parameters=parameters,
        pointers=tuple(0 if t is None else t.data_ptr() for t in parameters),
        hooks=tuple(hooks for module in _called_modules(layer, name)
                    for hooks in (module._forward_pre_hooks, module._forward_hooks)),
        buffer=buffer)


def split_concatenated(layer: LoraLinear, buffer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W0 and A as views of a concatenated buffer, in W0's layout: ((out, in) or (in, out), (r, in))."""
    out = layer.out_features
    if layer.fan_in_fan_out:                 # buffer (in, out + r) = [W0 | A^T]
        return buffer[:, :out], buffer[:, out:].T
    return buffer[:out], buffer[out:]        # buffer (out + r, in) = [W0; A]


def _active(layer: LoraLinear) -> list[str]:
    """The layer's active adapters that it holds."""
    held = layer._modules["lora_A"]._modules
    return [name for name in layer.active_adapters if name in held]


def weights(layer: LoraLinear, adapter: str) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(W0, b, A, B) of ``layer`` and ``adapter`` as the modules hold them now.

    Read from the modules' own dicts: ``layer.lora_A[adapter].weight`` goes through nn.Module's
    ``__getattr__`` and ModuleDict's ``__getitem__``, about 0.8 us a step on a 2-core CPU; eight
    of them per call were ~0.6% of a GPT-2 decode step (48 layers per token).
    """
    base = layer._modules["base_layer"]
    return (base._parameters["weight"], base._parameters.get("bias"),
            layer._modules["lora_A"]._modules[adapter]._parameters["weight"],
            layer._modules["lora_B"]._modules[adapter]._parameters["weight"])


def _registrations(layer: LoraLinear, adapter: str, parameters: tuple) -> tuple[tuple[dict, str, object], ...]:
    """Every (dict, key, value) on the way from ``layer`` to W0, b, A and B (``parameters``, from ``weights``).

    A module or Parameter put in place of another, by ``setattr``, ``ModuleDict[name] = ...`` or
    a write straight into ``_modules`` / ``_parameters`` (accelerate and quantizers do that),
    changes one of these dict entries."""
    W0, b, A, B = parameters
    modules = layer._modules
    base, lora_A, lora_B = modules["base_layer"], modules["lora_A"], modules["lora_B"]
    module_A, module_B = lora_A._modules[adapter], lora_B._modules[adapter]
    return ((modules, "base_layer", base), (modules, "lora_A", lora_A), (modules, "lora_B", lora_B),
            (lora_A._modules, adapter, module_A), (lora_B._modules, adapter, module_B),
            (base._parameters, "weight", W0), (base._parameters, "bias", b),
            (module_A._parameters, "weight", A), (module_B._parameters, "weight", B))


def _called_modules(layer: LoraLinear, adapter: str) -> tuple[nn.Module, ...]:
    """The modules the reference forward calls for ``adapter`` and the fused one does not."""
    return (layer._modules["base_layer"], layer._modules["lora_A"]._modules[adapter],
            layer._modules["lora_B"]._modules[adapter], layer._modules["lora_dropout"]._modules[adapter])


def _hooked(layer: LoraLinear) -> bool:
    """True if a module that the reference forward calls and the fused one skips has a hook: PEFT's
    layer calls them, so their hooks (a steering hook, accelerate's offloading) see and may change
    what they compute; the fused path then computes the reference way instead."""
    return any(module._forward_pre_hooks or module._forward_hooks
               or module._backward_pre_hooks or module._backward_hooks
               for adapter in _active(layer) for module in _called_modules(layer, adapter))


_data_ptr = torch.Tensor.data_ptr  # (read once here rather than looked up on each tensor's type per call)


def _is_current(state: dict, built: Concatenated) -> bool:
    """True if the buffer still holds the layer's W0, b and A, and B^T its B: same adapter, same
    modules and Parameters in place, each Parameter's data where it was at build time, and no
    forward hook on a module the fused call skips (``_hooked``). ``state`` is the layer's ``__dict__``.

    The data pointers are equal iff W0, b and A are still views of the buffer and B^T a view of
    B: the buffer and B^T keep that memory allocated, so no other tensor can have been given the
    same address since. This runs on every no-grad call. It reads the dicts it holds rather than
    walking ``layer.lora_A[adapter].weight``: in a GPT-2 decode step the walk from the layer, four
    times per call, cost ~1.5% of the step (cold caches: a layer's weights stream through them
    between two calls).
    """
    _, _, _, _, adapter, registered, (W0, b, A, B), pointers, hooks, _ = built
    active = state["active_adapters"]
    if len(active) != 1 or active[0] != adapter:
        return False
    for registry, key, held in registered:
        if registry.get(key) is not held:
            return False
    for hook_dict in hooks:
        if hook_dict:
            return False
    return (_data_ptr(W0) == pointers[0] and _data_ptr(A) == pointers[2] and _data_ptr(B) == pointers[3]
            and (b is None or _data_ptr(b) == pointers[1]))


def release_concatenated_weight(layer: LoraLinear) -> None:
    """Give W0, its bias and A their own contiguous storage back and drop the buffer, if there is one."""
    built = layer._concatenated
    if built is None:
        return
    adapters = [layer.lora_A[built.adapter]] if built.adapter in layer.lora_A else []  # the one it was built for
    tensors = [layer.base_layer.weight, layer.base_layer.bias, *(adapter.weight for adapter in adapters)]
    # and the Parameters it was built from, if another one took their place in the layer: a tied lm_head
    # is untied by merging (layer.py), and the input embedding keeps the old Parameter, a view of the buffer
    tensors += [t for t in built.parameters[:3] if t is not None and not any(t is u for u in tensors)]
    with torch.inference_mode(False), torch.no_grad():
        for tensor in tensors:
            if tensor is not None:
                tensor.data = tensor.data.clone(memory_format=torch.contiguous_format)
    layer._concatenated = None


def _concatenated_weight(layer: LoraLinear) -> Concatenated | None:
    """The layer's Concatenated, rebuilt first if the active adapter changed or W0, its bias, A or B
    (or a module holding one) was replaced by another; None where there is none (several adapters,
    mixed dtypes)."""
    built = layer._concatenated
    if built is not None and _is_current(layer.__dict__, built):
        return built
    release_concatenated_weight(layer)  # (a no-op if their storage is already their own)
    build_concatenated_weight(layer)
    return layer._concatenated


# ------------------------------------------------------------------------------------------------
# The fused forward
# ------------------------------------------------------------------------------------------------
def fused_forward(layer: LoraLinear, x: torch.Tensor) -> torch.Tensor:
    """h = W0 x + b + s * B A dropout(x), with the update added into the base output in place.

    Without gradients or dropout, and with one adapter active, the concatenated weight does it in
    one big matmul and one rank-r accumulate (``concatenated_forward``); otherwise the base matmul,
    ``x A^T`` and the accumulate (``addmm_forward``), which is also how it trains.

    The first test is the common case of inference (``torch.no_grad`` or ``inference_mode``, eval
    mode, the buffer current) in as few steps as it can be: at one token per call this function's
    own work is a visible part of a decode step (module docstring). So it reads the layer's flags
    from its ``__dict__`` and unpacks ``Concatenated`` as a tuple: ``layer.training`` on an
    nn.Module (whose class defines ``__getattr__``, which keeps Python from specialising the
    read) looks the name up through the class hierarchy first, in lookup caches that the weights'
    stream has emptied since the last call. Measured on GPT-2's c_attn with caches emptied
    between calls (one thread): the fused call went from +82 to +68 us over a bare Conv1D (merged:
    +19 us); in a decode step, where caches are only partly cold, that is a few tenths of a percent.
    """
    state = layer.__dict__
    built = state.get("_concatenated")
    if (built is not None and not is_grad_enabled() and not state["training"] and not state["merged_adapters"]
            and not state["disabled"] and _is_current(state, built)):
        return concatenated_forward(layer, x, built)
    if layer.merged or layer.disabled:
        return layer.base_layer(x)
    if any(layer.lora_bias[adapter] for adapter in _active(layer)):  # an adapter with lora_bias, set active
        raise MiniLoraError(_LORA_BIAS_REFUSAL)
    if _hooked(layer):
        return layer.forward(x, reference=True)
    if layer.fused_concatenate and not _needs_grad(layer, x) and not (layer.training and _dropout_active(layer)):
        built = _concatenated_weight(layer)
        if built is not None:
            return concatenated_forward(layer, x, built)
    return addmm_forward(layer, x)


def concatenated_forward(layer: LoraLinear, x: torch.Tensor, built: Concatenated) -> torch.Tensor:
    """Two ops beyond the base layer's: one matmul gives ``[x W0^T + b | x A^T]``, and one
    ``addmm_`` adds ``s (x A^T) B^T`` into its first ``out`` columns, in place.

    The output is a view of the (N, out + r) result (rows ``out + r`` apart): no copy is made.
    ``addmm(b, x, buffer^T)`` is what ``F.linear(x, buffer, b)`` runs for an nn.Linear, so both
    layouts take one line (``right``).
    """
    right, bias, B_T, (out, r), adapter, *_ = built                  # (in, out + r), (out + r,), (r, out)
    x2d = x.reshape(-1, layer.in_features)                           # (N, in)
    both = addmm(bias, x2d, right) if bias is not None else x2d @ right
    h, xa = both.split_with_sizes((out, r), 1)                       # (N, out) = x W0^T + b, (N, r) = x A^T
    if B_T.dtype != h.dtype:                                         # (torch.autocast: h and xa half)
        B_T = B_T.to(h.dtype)
    h.addmm_(xa, B_T, alpha=layer.scaling[adapter])                  # (N, out) += s (N, r) @ (r, out)
    return h.view(*x.shape[:-1], out)


def addmm_forward(layer: LoraLinear, x: torch.Tensor) -> torch.Tensor:
    """The base matmul, then per active adapter ``addmm_`` of ``s (x A^T) B^T`` into it, in place.

    Gradients flow as in the reference path: ``addmm_`` is an ordinary autograd op whose backward
    needs ``x A^T`` and ``B`` only (no output-sized tensor is saved or made).
    """
    x2d = x.reshape(-1, layer.in_features)                           # (N, in)
    out2d = base_matmul(layer, x2d)                                  # (N, out)
    for adapter in _active(layer):  # usually one; each active adapter adds its own update
        _, _, weight_A, weight_B = weights(layer, adapter)           # (r, in), (out, r)
        same = weight_A.dtype == out2d.dtype
        x_adapter = x2d if same else x2d.to(weight_A.dtype)          # half base, float32 adapter
        if layer.training:  # (nn.Identity outside training or with p = 0: not called)
            x_adapter = layer.lora_dropout[adapter](x_adapter)
        xa = F.linear(x_adapter, weight_A)                           # (N, in) @ (in, r) -> (N, r)
        if not same:
            xa, weight_B = xa.to(out2d.dtype), weight_B.to(out2d.dtype)
        out2d.addmm_(xa, weight_B.T, alpha=layer.scaling[adapter])   # (N, out) += s (N, r) @ (r, out)
    return out2d.view(*x.shape[:-1], layer.out_features)


def base_matmul(layer: LoraLinear, x2d: torch.Tensor) -> torch.Tensor:
    """W0 x + b for rows x2d (N, in) -> (N, out), a new tensor (never a view), in each layout."""
    base = layer._modules["base_layer"]  # (dict reads: see weights())
    weight, bias = base._parameters["weight"], base._parameters.get("bias")
    if layer.fan_in_fan_out:  # Conv1D: weight (in, out); out = b + x W
        return torch.addmm(bias, x2d, weight) if bias is not None else x2d @ weight
    return F.linear(x2d, weight, bias)  # nn.Linear: weight (out, in); out = x W^T + b


def _needs_grad(layer: LoraLinear, x: torch.Tensor) -> bool:
    """True if autograd must see this call: grad mode is on and the input or a weight requires grad."""
    if not torch.is_grad_enabled():
        return False
    bias = layer.base_layer.bias
    return x.requires_grad or layer.base_layer.weight.requires_grad or (bias is not None and bias.requires_grad) \
        or any(p.requires_grad for a in _active(layer) for p in (layer.lora_A[a].weight, layer.lora_B[a].weight))


def _dropout_active(layer: LoraLinear) -> bool:
    """True if an active adapter has a dropout (it draws masks in training mode)."""
    return any(isinstance(layer.lora_dropout[a], nn.Dropout) for a in _active(layer))
