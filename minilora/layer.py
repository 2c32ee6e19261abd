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
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import MiniLoraError

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


class LoraLinear(nn.Module):
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

    Attributes:
        lora_A: nn.Linear(in, r, bias=False), weight (r, in).
        lora_B: nn.Linear(r, out, bias=False), weight (out, r).
        scaling: the float in front of ``B A``.
        fan_in_fan_out: True for Conv1D (weight stored (in, out)).
        merged: True while ``W0`` holds ``W0 + scaling * B A``.
        disabled: True while the adapter is switched off (``minilora.disabled``).

    Raises:
        MiniLoraError: if ``base_layer`` is neither nn.Linear nor Conv1D, or r <= 0.
    """

    # Another way to compute the same output, (layer, x) -> h, set by minilora.set_forward_path
    # (minilora/fused.py); None runs the reference forward below.
    forward_override = None

    def __init__(
        self,
        base_layer: nn.Module,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights: bool | str = True,
    ) -> None:
        super().__init__()
        in_features, out_features = in_out_features(base_layer)
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise MiniLoraError(f"r must be a positive int, got {r!r}.")
        self.base_layer = base_layer
        self.in_features, self.out_features = in_features, out_features
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        self.r = r
        self.lora_alpha = lora_alpha
        self.scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.lora_dropout = nn.Dropout(p=lora_dropout) if lora_dropout > 0.0 else nn.Identity()
        self.merged = False
        self.disabled = False

        # PEFT builds A and B as nn.Linear on the CPU in the default dtype. Building them draws
        # nn.Linear's own init from the RNG (A first, then B); we draw the same numbers so that the
        # same seed gives the same adapter as peft.get_peft_model.
        self.lora_A = nn.Linear(in_features, r, bias=False)   # weight (r, in)
        self.lora_B = nn.Linear(r, out_features, bias=False)  # weight (out, r)
        self._init_adapter_weights(init_lora_weights)
        self._match_base_device_and_dtype()

    def _init_adapter_weights(self, init_lora_weights: bool | str) -> None:
        """Mirror of PEFT's ``LoraLayer.reset_lora_parameters`` (peft 0.21.2, tuners/lora/layer.py).

        A is redrawn, B is zeroed: ``B A = 0`` so training starts from the base model. loralib and
        PEFT draw A like nn.Linear's default (kaiming-uniform with a = sqrt(5)).
        """
        if init_lora_weights is False:
            return  # keep the random nn.Linear init of both: a non-zero B A
        if init_lora_weights is True:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        elif init_lora_weights == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / self.r)
        else:
            raise MiniLoraError(f"init_lora_weights must be True, False or 'gaussian', got {init_lora_weights!r}.")
        nn.init.zeros_(self.lora_B.weight)

    def _match_base_device_and_dtype(self) -> None:
        """Put A and B on the base layer's device; their dtype follows PEFT's default.

        PEFT first casts the adapter to the base weight's dtype, then (``autocast_adapter_dtype=True``)
        casts float16 / bfloat16 adapters up to float32, so that the small update is trained in
        full precision. The round trip rounds the initial values to the base dtype once; we do the
        same so that the same seed gives the same numbers.
        """
        weight = self.base_layer.weight
        dtype = weight.dtype if weight.dtype.is_floating_point else None
        self.lora_A.to(weight.device, dtype)
        self.lora_B.to(weight.device, dtype)
        if dtype in HALF_DTYPES:
            self.lora_A.to(torch.float32)
            self.lora_B.to(torch.float32)

    # ----------------------------------------------------------------------------------------
    # The update, and folding it into W0
    # ----------------------------------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        """dW = scaling * B A, in the base weight's layout: (out, in) for Linear, (in, out) for Conv1D.

        This is the one place dW is computed; merge and unmerge both use it. As PEFT does, a
        half-precision adapter on the CPU is multiplied in float32 (CPU half matmuls are slow and
        less exact) and the result cast back.
        """
        weight_A, weight_B = self.lora_A.weight, self.lora_B.weight
        dtype = weight_B.dtype
        cast_to_fp32 = weight_B.device.type == "cpu" and dtype in HALF_DTYPES
        if cast_to_fp32:
            weight_A, weight_B = weight_A.float(), weight_B.float()
        delta = weight_B @ weight_A  # (out, r) @ (r, in) -> (out, in)
        if self.fan_in_fan_out:
            delta = delta.T  # (in, out), the Conv1D layout
        delta = delta * self.scaling
        return delta.to(dtype) if cast_to_fp32 else delta

    def merge(self, safe: bool = False) -> None:
        """W0 <- W0 + dW. Afterwards forward is a single matmul and gives the same outputs.

        Args:
            safe: compute the merged weight in a copy and raise if it is not finite, leaving W0
                untouched; otherwise add in place.

        Merging a merged layer warns and does nothing.
        """
        if self.merged:
            warnings.warn("LoraLinear is already merged; nothing to do.", stacklevel=2)
            return
        weight = self.base_layer.weight
        with torch.no_grad():
            if safe:
                merged_weight = weight.data.clone()
                merged_weight += self.delta_weight().to(weight.dtype)  # as PEFT's safe_merge
                if not torch.isfinite(merged_weight).all():
                    raise MiniLoraError(
                        "The merged weight has NaN or inf values: the adapter is broken (check the loss "
                        "during training). W0 was left unchanged."
                    )
                weight.data = merged_weight
            else:
                weight.data += self.delta_weight()
        self.merged = True

    def unmerge(self) -> None:
        """W0 <- W0 - dW: the inverse of ``merge`` up to rounding (about 1e-8 in float32).

        Unmerging an unmerged layer warns and does nothing.
        """
        if not self.merged:
            warnings.warn("LoraLinear is not merged; nothing to unmerge.", stacklevel=2)
            return
        weight = self.base_layer.weight
        with torch.no_grad():
            weight.data -= self.delta_weight().to(weight.dtype)
        self.merged = False

    # ----------------------------------------------------------------------------------------
    # Forward
    # ----------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """h = base_layer(x) + scaling * lora_B(lora_A(dropout(x))), PEFT's operations in PEFT's order.

        Merged or disabled, the update is either inside W0 already or switched off: one matmul.
        """
        if self.forward_override is not None:
            return self.forward_override(self, x)
        result = self.base_layer(x)                        # (..., out)
        if self.merged or self.disabled:
            return result
        result_dtype = result.dtype
        if x.dtype != self.lora_A.weight.dtype:
            x = x.to(self.lora_A.weight.dtype)             # half base, float32 adapter
        update = self.lora_B(self.lora_A(self.lora_dropout(x)))  # (..., r) -> (..., out)
        result = result + update * self.scaling
        return result.to(result_dtype)

    def extra_repr(self) -> str:
        return (
            f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:g}, "
            f"fan_in_fan_out={self.fan_in_fan_out}, merged={self.merged}"
        )
