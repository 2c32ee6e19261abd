"""LoraLinear: a frozen linear layer plus a trainable low-rank update.

    h = W0 x + (alpha / r) * B A x          A: (r, in)   B: (out, r)

``W0`` is the wrapped layer's weight and never trains. Only ``A`` and ``B`` train: r * (in + out)
numbers instead of in * out. ``B`` starts at zero, so a fresh adapter returns exactly the base
layer's output.

Two kinds of base layer are wrapped:
- ``torch.nn.Linear`` stores its weight (out, in) and computes ``x W^T + b``.
- GPT-2's ``transformers.pytorch_utils.Conv1D`` stores its weight (in, out) and computes
  ``x W + b``. That transposed layout is what PEFT calls ``fan_in_fan_out``; the update
  ``B A`` (out, in) must be transposed before it is added to such a weight.

One layer can hold several adapters, each under a name (the first is "default"), as PEFT's layers
do; the *active* ones each add their own update:

    h = W0 x + sum over active adapters a of  (alpha_a / r_a) * B_a A_a x

An adapter built with ``lora_bias`` (PEFT's option) gives B a trainable bias b as well; its term is
then ``(alpha / r) * (B A x + b)``, and merging adds ``(alpha / r) * b`` to the base layer's bias.

Their A, B and dropout live in ``nn.ModuleDict``s keyed by adapter name, so a parameter is called
``<layer>.lora_A.default.weight``: PEFT's in-memory name, which makes trainable-parameter names
and state dicts line up with PEFT's (files on disk drop the name of the default adapter, as PEFT's do).
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import MiniLoraError
from .peft_attributes import PeftLayerAttributes, peft_warning

HALF_DTYPES = (torch.float16, torch.bfloat16)


def in_out_features(base_layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or a Conv1D, read from the weight's layout."""
    if isinstance(base_layer, Conv1D):
        fan_in, fan_out = base_layer.weight.shape  # Conv1D stores (in, out)
        assert fan_out == base_layer.nf, "Conv1D weight must be (in, out)"
        return fan_in, fan_out
    if isinstance(base_layer, nn.Linear):
        return base_layer.in_features, base_layer.out_features  # nn.Linear stores (out, in)
    raise MiniLoraError(
        f"LoRA wraps nn.Linear or transformers' Conv1D, not {type(base_layer).__name__}. "
        "Pick target_modules that name linear layers."
    )


def _placeholders_error(adapter: str) -> MiniLoraError:
    """A forward through A and B that hold no values (meta tensors) would give meaningless numbers (PEFT's does)."""
    return MiniLoraError(f"Adapter {adapter!r}'s A and B are placeholders on the meta device (made with "
                         "low_cpu_mem_usage=True) and hold no values yet: load them first, e.g. "
                         "set_peft_model_state_dict(model, state_dict, adapter_name=..., low_cpu_mem_usage=True). "
                         "(PEFT's forward gives meaningless numbers here.)")


class LoraLinear(nn.Module, PeftLayerAttributes):
    """x -> base_layer(x) + (lora_alpha / r) * lora_B(lora_A(dropout(x))).

    The operations and their order are PEFT's ``lora.Linear.forward``, so that with equal weights
    the float32 outputs on CPU are bitwise equal to PEFT's.

    Args:
        base_layer: the nn.Linear or Conv1D to adapt. It is wrapped, not copied, and frozen.
        r: rank of the update.
        lora_alpha: scale numerator; ``scaling = lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``).
        lora_dropout: dropout on the adapter's input; 0 uses ``nn.Identity`` as PEFT does.
        use_rslora: use ``lora_alpha / sqrt(r)``.
        init_lora_weights: True (kaiming-uniform A, zero B), "gaussian" (A ~ N(0, 1/r), zero B),
            or False (both keep nn.Linear's random init: a non-zero update, for tests).
        adapter_name: the name this first adapter is kept under.
        lora_bias: give B a bias b: the update is ``scaling * (B A x + b)`` (PEFT's ``lora_bias``).
        autocast_adapter_dtype: for a float16 / bfloat16 base layer, keep A and B in float32 (True,
            PEFT's default: the small update trains in full precision) or in the base dtype (False).

    Attributes (one entry per adapter, keyed by its name, as in PEFT):
        lora_A: nn.ModuleDict of nn.Linear(in, r, bias=False), weight (r, in).
        lora_B: nn.ModuleDict of nn.Linear(r, out, bias=False), weight (out, r).
        lora_dropout: nn.ModuleDict of nn.Dropout or nn.Identity.
        r, lora_alpha, scaling: dicts of numbers; ``scaling[name]`` is the float in front of ``B A``.
        lora_bias: dict of bools: True where lora_B has a bias.
        active_adapters: the names whose update forward adds, in this order.
        merged_adapters: the names whose ``dW`` W0 holds now; ``merged`` is True if there is any.
        fan_in_fan_out: True for Conv1D (weight stored (in, out)).
        disabled: True while the adapters are switched off (``minilora.disabled``).
        (PEFT's names for these and a few more, e.g. ``disable_adapters``, ``get_base_layer()``,
        come from ``PeftLayerAttributes``: peft_attributes.py.)

    Raises:
        MiniLoraError: if ``base_layer`` is neither nn.Linear nor Conv1D, or r <= 0.
    """

    # Another way to compute the same output, (layer, x) -> h, set by minilora.set_forward_path
    # (minilora/fused.py); None runs the reference forward below. The fused path's state:
    forward_override = None
    fused_concatenate = True   # set_forward_path(model, "fused", concatenate=...)
    _concatenated = None       # its concatenated weight [W0; A] (fused.Concatenated), once built

    def __init__(
        self,
        base_layer: nn.Module,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights: bool | str = True,
        adapter_name: str = "default",
        autocast_adapter_dtype: bool = True,
        lora_bias: bool = False,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = in_out_features(base_layer)
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        self.lora_A, self.lora_B, self.lora_dropout = nn.ModuleDict(), nn.ModuleDict(), nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_bias: dict[str, bool] = {}
        self.active_adapters: list[str] = [adapter_name]
        self.merged_adapters: list[str] = []
        self.disabled = False
        # Names of other parameters that share base_layer.weight (GPT-2's lm_head and wte; set by
        # inject), and while merged the shared weight this layer was untied from (see merge).
        self.tied_to: list[str] = []
        self.untied_weight: nn.Parameter | None = None
        self.add_adapter(adapter_name, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights,
                         autocast_adapter_dtype, lora_bias)
        # A state dict taken while merged records it, so that loading it gives the same model (below).
        self._register_state_dict_hook(_record_merged_adapters)
        self._register_load_state_dict_pre_hook(_restore_merged_adapters, with_module=True)

    # ----------------------------------------------------------------------------------------
    # Forward: the math
    # ----------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, reference: bool = False) -> torch.Tensor:
        """h = base_layer(x) + scaling * lora_B(lora_A(dropout(x))), PEFT's operations in PEFT's order.

        With several active adapters each adds its own ``scaling * B A dropout(x)`` in turn.
        Merged or disabled, the update is either inside W0 already or switched off: one matmul.
        ``reference=True`` computes it so even where ``set_forward_path`` chose another path (the
        fused path does, where a module it would not call has hooks).
        """
        try:
            if self.forward_override is not None and not reference:
                return self.forward_override(self, x)
            if self.disabled and self.merged_adapters:
                self.unmerge()  # as PEFT: a disabled layer gives W0 x, so dW leaves W0 (minilora.disabled refuses this)
            # self.base_layer(x), read from _modules as nn.Module.__getattr__ would, without its Python call: merged,
            # this line is all the layer does, and at one token per call such steps were ~1% of a GPT-2 decode step
            result = self._modules["base_layer"](x)            # (..., out)
            if self.merged_adapters or self.disabled:
                return result
            result_dtype = result.dtype
            for adapter in self.active_adapters:
                if adapter not in self.lora_A:
                    continue  # active on other layers only (PEFT skips it too)
                weight_A = self.lora_A[adapter].weight
                if weight_A.is_meta:  # (low_cpu_mem_usage=True's placeholders, not loaded yet)
                    raise _placeholders_error(adapter)
                if x.dtype != weight_A.dtype:
                    x = x.to(weight_A.dtype)  # e.g. half base, float32 A (PEFT's _cast_input_dtype)
                result = result + self.lora_update(x, adapter)
            return result.to(result_dtype)
        except RuntimeError:
            self._check_base_weight_shape()  # W0 replaced by one that no longer fits A and B: say so
            raise

    def lora_update(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        """One adapter's term of h: scaling * B A dropout(x), (..., in) -> (..., r) -> (..., out)
        (with lora_bias, lora_B adds its bias b before the scaling: scaling * (B A dropout(x) + b))."""
        lora_A, lora_B, dropout = self.lora_A[adapter], self.lora_B[adapter], self.lora_dropout[adapter]
        return lora_B(lora_A(dropout(x))) * self.scaling[adapter]

    # ----------------------------------------------------------------------------------------
    # Building an adapter
    # ----------------------------------------------------------------------------------------
    def add_adapter(
        self,
        adapter_name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights: bool | str = True,
        autocast_adapter_dtype: bool = True,
        lora_bias: bool = False,
    ) -> None:
        """Build adapter ``adapter_name``: A and B drawn as PEFT's ``update_layer`` draws them.

        The active adapters stay as they were (a new one on a fresh layer is active because
        ``__init__`` made it so); the new A and B require grad only if the adapter is active, as in PEFT.
        """
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise MiniLoraError(f"r must be a positive int, got {r!r}.")
        if init_lora_weights not in (True, False, "gaussian"):
            raise MiniLoraError(f"init_lora_weights must be True, False or 'gaussian', got {init_lora_weights!r}.")
        check_autocast_adapter_dtype(autocast_adapter_dtype)
        if lora_bias and getattr(self.base_layer, "bias", None) is None:
            kind = type(self.base_layer).__name__
            warnings.warn(f"`lora_bias=True` was passed but the targeted layer of type {kind} has no bias. This means "
                          "that merging LoRA weights won't be possible.", peft_warning(), stacklevel=3)
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.lora_dropout[adapter_name] = nn.Dropout(p=lora_dropout) if lora_dropout > 0.0 else nn.Identity()
        # PEFT builds A and B as nn.Linear on the CPU in the default dtype. Building them draws
        # nn.Linear's own init from the RNG (A first, then B); we draw the same numbers so that the
        # same seed gives the same adapter as peft.get_peft_model.
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False)   # weight (r, in)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=lora_bias)  # weight (out, r), bias (out,)
        self.lora_bias[adapter_name] = lora_bias
        self._init_adapter_weights(adapter_name, init_lora_weights)
        self._match_base_device_and_dtype(adapter_name, autocast_adapter_dtype)
        for module in (self.lora_A[adapter_name], self.lora_B[adapter_name], self.lora_dropout[adapter_name]):
            module.train(self.training)  # the layer's mode, not a new module's (train)
            module.requires_grad_(adapter_name in self.active_adapters)

    def _init_adapter_weights(self, adapter_name: str, init_lora_weights: bool | str) -> None:
        """Mirror of PEFT's ``LoraLayer.reset_lora_parameters`` (peft 0.21.2, tuners/lora/layer.py).

        A is redrawn, B is zeroed: ``B A = 0`` so training starts from the base model. loralib and
        PEFT draw A like nn.Linear's default (kaiming-uniform with a = sqrt(5)).
        """
        if init_lora_weights is False:
            return  # keep the random nn.Linear init of both: a non-zero B A
        if init_lora_weights is True:
            nn.init.kaiming_uniform_(self.lora_A[adapter_name].weight, a=math.sqrt(5))
        else:  # "gaussian"
            nn.init.normal_(self.lora_A[adapter_name].weight, std=1 / self.r[adapter_name])
        nn.init.zeros_(self.lora_B[adapter_name].weight)
        if self.lora_bias[adapter_name]:
            nn.init.zeros_(self.lora_B[adapter_name].bias)

    def _match_base_device_and_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """Put A and B on the base layer's device, in its dtype, as PEFT does.

        With ``autocast_adapter_dtype`` (PEFT's default) PEFT then casts float16 / bfloat16 adapters
        up to float32, so that the small update is trained in full precision. The round trip rounds
        the initial values to the base dtype once; we do the same so that the same seed gives the
        same numbers. Without it, A and B stay in the base dtype (forward then runs in half precision).
        """
        weight = self.base_layer.weight
        dtype = weight.dtype if weight.dtype.is_floating_point else None
        for matrix in (self.lora_A[adapter_name], self.lora_B[adapter_name]):
            matrix.to(weight.device, dtype)
            if dtype in HALF_DTYPES and autocast_adapter_dtype:
                matrix.to(torch.float32)

    # ----------------------------------------------------------------------------------------
    # Which adapters take part
    # ----------------------------------------------------------------------------------------
    @property
    def active_adapter(self) -> str:
        """The one active adapter's name; MiniLoraError if several (or none) are active."""
        if len(self.active_adapters) != 1:
            raise MiniLoraError(f"{len(self.active_adapters)} adapters are active ({self.active_adapters}); "
                                "name the one you mean.")
        return self.active_adapters[0]

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        """Make ``adapter_names`` the active adapters; their A and B require grad (unless
        ``inference_mode``), every other adapter's do not: PEFT's ``set_adapter`` of a layer."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in self.lora_A:
            for param in (*self.lora_A[name].parameters(), *self.lora_B[name].parameters()):
                param.requires_grad_(name in names and not inference_mode)
        self.active_adapters = names

    def enable_adapters(self, enabled: bool) -> None:
        """Switch this layer's adapters on or off (PEFT's layer ``enable_adapters``). Off: forward gives
        ``W0 x`` and no adapter requires grad; on again: the active adapters require grad."""
        if enabled:
            self.set_adapter(self.active_adapters)
        else:
            for name in self.lora_A:
                self.lora_A[name].requires_grad_(False)
                self.lora_B[name].requires_grad_(False)
        self.disabled = not enabled

    def active_after_delete(self, adapter_name: str) -> list[str]:
        """The active adapters once ``adapter_name`` is deleted: the others, or (none left) the first
        remaining name in sorted order, as in PEFT."""
        remaining = [name for name in self.active_adapters if name != adapter_name]
        if adapter_name in self.active_adapters and not remaining:
            remaining = sorted(name for name in self.lora_A if name != adapter_name)[:1]
        return remaining

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter's A, B, dropout and numbers. If it was active, the others stay active,
        or (none left) the first remaining name in sorted order becomes active, as in PEFT."""
        remaining = self.active_after_delete(adapter_name)
        for table in (self.lora_A, self.lora_B, self.lora_dropout, self.r, self.lora_alpha, self.scaling,
                      self.lora_bias):
            if adapter_name in table:
                del table[adapter_name]
        if adapter_name in self.active_adapters:
            if remaining and remaining[0] not in self.active_adapters:
                warnings.warn(f"Adapter {adapter_name} was active which is now deleted. Setting active adapter to "
                              f"{remaining[0]}.", stacklevel=2)
            self.set_adapter(remaining)

    # ----------------------------------------------------------------------------------------
    # The update, and folding it into W0
    # ----------------------------------------------------------------------------------------
    def delta_weight(self, adapter: str | None = None) -> torch.Tensor:
        """dW = scaling * B A, in the base weight's layout: (out, in) for Linear, (in, out) for Conv1D.

        Args:
            adapter: whose dW; None means the one active adapter.

        This is the one place dW is computed; merge and unmerge both use it. As PEFT does, a
        half-precision adapter on the CPU is multiplied in float32 (CPU half matmuls are slow and
        less exact) and the result cast back.
        """
        adapter = self.active_adapter if adapter is None else adapter
        weight_A, weight_B = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        dtype = weight_B.dtype
        cast_to_fp32 = weight_B.device.type == "cpu" and dtype in HALF_DTYPES
        if cast_to_fp32:
            weight_A, weight_B = weight_A.float(), weight_B.float()
        delta = weight_B @ weight_A  # (out, r) @ (r, in) -> (out, in)
        if self.fan_in_fan_out:
            delta = delta.T  # (in, out), the Conv1D layout
        delta = delta * self.scaling[adapter]
        return delta.to(dtype) if cast_to_fp32 else delta

    @property
    def merged(self) -> bool:
        """True while W0 holds the dW of at least one adapter."""
        return bool(self.merged_adapters)

    def merge(self, safe: bool = False, adapter_names: list[str] | None = None) -> None:
        """W0 <- W0 + dW for each adapter named (default: the active ones) not merged yet.

        Afterwards forward is a single matmul and gives the same outputs.

        Args:
            safe: compute each adapter's merged weight in a copy and raise if it is not finite, before
                writing it (adapters named before it stay merged, as PEFT's); otherwise add in place.
            adapter_names: which adapters to fold in; None means the active adapters.

        Merging what is already merged warns (PEFT's words) and skips it.
        """
        names = list(self.active_adapters if adapter_names is None else adapter_names)
        self.check_bias_mergeable(names)
        if self.merged:
            names = [name for name in names if name not in self.merged_adapters]
            if names:
                warnings.warn(f"Already following adapters were merged {','.join(self.merged_adapters)}. "
                              f"You are now additionally merging {','.join(names)}.", stacklevel=2)
            else:
                warnings.warn("All adapters are already merged, nothing to do.", stacklevel=2)
        if self.tied_to and not self.merged and any(name in self.lora_A for name in names):  # (else nothing merges here)
            self._untie()
        weight = self.base_layer.weight
        for adapter in (name for name in names if name in self.lora_A):
            with torch.no_grad():
                if safe:
                    merged_weight = weight.data.clone()
                    merged_weight += self.delta_weight(adapter).to(weight.dtype)  # as PEFT's safe_merge
                    merged_bias = self._merged_bias(adapter)
                    if not torch.isfinite(merged_weight).all() or (
                            merged_bias is not None and not torch.isfinite(merged_bias).all()):
                        raise self._broken_adapter_error(adapter)
                    weight.data = merged_weight
                    if merged_bias is not None:
                        self.base_layer.bias.data = merged_bias.to(weight.dtype)
                else:
                    weight.data += self.delta_weight(adapter)
                    if self.lora_bias.get(adapter):
                        self.base_layer.bias.data += self.lora_B[adapter].bias * self.scaling[adapter]  # b0 + s b
            self.merged_adapters.append(adapter)

    def _broken_adapter_error(self, adapter: str) -> MiniLoraError:
        """merge(safe=True) found W0 + dW of ``adapter`` not finite: the layer is tied again if nothing was
        merged (as it was), and the error says what W0 holds now."""
        if not self.merged and self.untied_weight is not None:  # as it was: tied
            self.base_layer.weight, self.untied_weight = self.untied_weight, None
        held = (f"W0 holds only the adapters merged before it, {self.merged_adapters} (as PEFT's; "
                "unmerge takes them out)" if self.merged else "W0 was left unchanged")
        return MiniLoraError(
            f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken (PEFT's "
            f"words): the merged weight has NaN or inf values (check the loss during training). {held}."
        )

    def _merged_bias(self, adapter: str) -> torch.Tensor | None:
        """b0 + scaling * b for an adapter with lora_bias (PEFT's safe_merge order), else None."""
        if not self.lora_bias.get(adapter):
            return None
        return self.base_layer.bias + self.lora_B[adapter].bias * self.scaling[adapter]

    def check_bias_mergeable(self, adapter_names: list[str]) -> None:
        """Raise if one of ``adapter_names`` has lora_bias but the base layer has no bias to fold ``s * b`` into."""
        with_bias = [name for name in adapter_names if self.lora_bias.get(name)]
        if with_bias and getattr(self.base_layer, "bias", None) is None:
            raise MiniLoraError(f"Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias "
                                f"(adapters {with_bias}): keep them unmerged, or train them with lora_bias=False.")

    def unmerge(self) -> None:
        """W0 <- W0 - dW for every merged adapter, last merged first: the inverse of ``merge`` up to
        rounding (about 1e-8 in float32).

        Unmerging an unmerged layer warns (PEFT's words) and does nothing.
        """
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        weight = self.base_layer.weight
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            with torch.no_grad():
                weight.data -= self.delta_weight(adapter).to(weight.dtype)
                if self.lora_bias.get(adapter):
                    self.base_layer.bias.data -= self.lora_B[adapter].bias * self.scaling[adapter]
        if self.untied_weight is not None:  # tie it again: the shared weight was never changed
            self.base_layer.weight, self.untied_weight = self.untied_weight, None

    def _untie(self) -> None:
        """Give base_layer a weight of its own before merging: W0 is shared with ``tied_to`` (e.g. GPT-2's
        lm_head with the input embedding), and W0 + dW in place would change those too."""
        shared = self.base_layer.weight
        warnings.warn(f"Merging unties this layer's weight from {self.tied_to}: W0 + dW is written to a copy, "
                      "the shared weight stays as it was (unmerge ties them again).", stacklevel=3)
        self.untied_weight = shared
        self.base_layer.weight = nn.Parameter(shared.detach().clone(), requires_grad=shared.requires_grad)

    def _check_base_weight_shape(self) -> None:
        """A and B were sized for W0's shape; a W0 replaced by one of another shape (transformers'
        ``resize_token_embeddings`` after inject re-ties a GPT-2 ``lm_head`` this way, past
        ``__setattr__``) no longer fits them. Called when forward fails, so it costs nothing otherwise."""
        adapter = next(iter(self.lora_A), None)
        if adapter is None:
            return
        in_features = self.lora_A[adapter].weight.shape[1]   # A: (r, in)
        out_features = self.lora_B[adapter].weight.shape[0]  # B: (out, r)
        expected = (in_features, out_features) if self.fan_in_fan_out else (out_features, in_features)
        if tuple(self.base_layer.weight.shape) != expected:
            raise MiniLoraError(
                f"This LoRA layer's base weight is now {tuple(self.base_layer.weight.shape)}, but its adapters "
                f"were built for {expected}. This happens with resize_token_embeddings after inject when lm_head "
                "has LoRA: resize the embeddings before inject, or leave lm_head out of target_modules."
            )

    # ----------------------------------------------------------------------------------------
    # What code written for the wrapped layer reads
    # ----------------------------------------------------------------------------------------
    # Models inspect their own layers: T5 reads ``self.wo.weight.dtype``, ``get_output_embeddings()``
    # and ``resize_token_embeddings`` read ``lm_head.weight``. As PEFT's layers do, the wrapper
    # answers with the base layer's (``in_features`` / ``out_features`` are set in __init__).
    @property
    def weight(self) -> torch.Tensor:
        """W0: the wrapped layer's weight (it holds dW too while merged)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def __setattr__(self, name: str, value) -> None:
        """``layer.weight = p`` (transformers ties ``lm_head.weight`` to the input embedding this way)
        sets the base layer's weight; a weight of another shape (``resize_token_embeddings`` after
        inject) would no longer fit B and A, so it is refused."""
        if name in ("weight", "bias") and "base_layer" in self.__dict__.get("_modules", {}):
            old = getattr(self.base_layer, name)
            if old is not None and value is not None and tuple(value.shape) != tuple(old.shape):
                raise MiniLoraError(
                    f"Setting the {name} of a LoRA-wrapped layer to shape {tuple(value.shape)} (it is "
                    f"{tuple(old.shape)}): A and B are sized for the old shape. This happens with "
                    "resize_token_embeddings after inject when lm_head has LoRA (transformers has then already "
                    "resized the input embedding): resize the embeddings before inject, or leave lm_head out "
                    "of target_modules."
                )
            setattr(self.base_layer, name, value)
            return
        super().__setattr__(name, value)

    @property
    def nx(self) -> int:
        """Conv1D's input size (GPT-2 code reads it); an nn.Linear has none."""
        return self.base_layer.nx

    @property
    def nf(self) -> int:
        """Conv1D's output size."""
        return self.base_layer.nf

    def extra_repr(self) -> str:
        adapters = "; ".join(f"{name}: r={self.r[name]}, lora_alpha={self.lora_alpha[name]}, "
                             f"scaling={self.scaling[name]:g}" for name in self.lora_A)
        return (f"{adapters}; active={self.active_adapters}, fan_in_fan_out={self.fan_in_fan_out}, "
                f"merged={self.merged}")


def check_autocast_adapter_dtype(value: object) -> None:
    """``autocast_adapter_dtype`` is a bool: a string such as "false" would read as true."""
    if not isinstance(value, bool):
        raise MiniLoraError(f"autocast_adapter_dtype must be True or False (a bool), got {value!r}.")


# ------------------------------------------------------------------------------------------------
# The merged state travels with the state dict
# ------------------------------------------------------------------------------------------------
# While merged, W0 in a state dict holds W0 + dW. Loaded into a model whose layers are not merged,
# forward would add B A x once more (PEFT does exactly that). So ``state_dict()`` adds, per merged
# adapter, ``<layer>.lora_merged.<adapter>`` (its place in the merge order, a 0-d tensor); loading a
# state dict that holds the layer's W0 sets the layer's merged adapters to what the state dict says
# (none if it has no such keys): ``torch.save(model.state_dict())`` / ``load_state_dict`` round-trips
# exactly, merged or not, in either direction.
MERGED_KEY = "lora_merged"


def _record_merged_adapters(layer: LoraLinear, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    for order, name in enumerate(layer.merged_adapters):
        state_dict[f"{prefix}{MERGED_KEY}.{name}"] = torch.tensor(order)


def _restore_merged_adapters(layer: LoraLinear, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                             missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
    flags = {key: state_dict.pop(key) for key in [key for key in state_dict if key.startswith(f"{prefix}{MERGED_KEY}.")]}
    if f"{prefix}base_layer.weight" not in state_dict:
        if flags:  # a merged flag without the W0 it describes
            error_msgs.append(f"{prefix}: the state dict says adapters are merged but holds no "
                              f"{prefix}base_layer.weight; load W0 together with the flags.")
        return
    merged = [key.rsplit(".", 1)[1] for key, _ in sorted(flags.items(), key=lambda item: int(item[1]))]
    unknown = [name for name in merged if name not in layer.lora_A]
    if unknown:
        error_msgs.append(f"{prefix}: the state dict's W0 holds the update of adapters {unknown}, which this layer "
                          "does not have.")
        return
    if merged and layer.tied_to and layer.untied_weight is None:
        layer._untie()  # W0 + dW is about to be loaded: into a weight of this layer's own
    elif not merged and layer.untied_weight is not None:
        layer.base_layer.weight, layer.untied_weight = layer.untied_weight, None  # plain W0: tied again
    layer.merged_adapters = merged
