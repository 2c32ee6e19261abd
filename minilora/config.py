"""LoraConfig: what to adapt and how, with PEFT's field names and defaults.

A LoRA adapter replaces a frozen layer ``h = W0 x`` by ``h = W0 x + (alpha / r) B A x``, where
``A`` is (r, in) and ``B`` is (out, r). The config says which layers get an adapter
(``target_modules``) and the numbers in that formula (``r``, ``lora_alpha``, ...).

Every field is checked when the config is built, so a bad value fails here, long before a model
is touched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union


class MiniLoraError(ValueError):
    """The one error minilora raises for bad input. The message says what was wrong and what to do."""


# PEFT's default targets per architecture (peft/utils/constants.py), for what minilora supports.
DEFAULT_TARGET_MODULES = {
    "gpt2": ["c_attn"],
}

BIAS_MODES = ("none", "all", "lora_only")


@dataclass
class LoraConfig:
    """Which layers get LoRA, and with which numbers. Field names and defaults follow PEFT.

    Args:
        r: rank of the update ``B A``; ``A`` is (r, in), ``B`` is (out, r). A positive int.
        lora_alpha: the update is scaled by ``lora_alpha / r`` (or ``lora_alpha / sqrt(r)`` with
            ``use_rslora``), so changing ``r`` does not change the update's size at init.
        lora_dropout: dropout applied to the adapter's input only (not to ``W0 x``); in [0, 1).
        target_modules: which modules to wrap. ``None``: the architecture's default (``["c_attn"]``
            for GPT-2). A list: module names or name suffixes (``"c_attn"`` matches
            ``"transformer.h.0.attn.c_attn"``). A string: a regex that must match the full name.
        fan_in_fan_out: True when the base weight is stored (in, out) as in GPT-2's Conv1D.
            ``None`` lets minilora decide per layer (True for Conv1D, False for nn.Linear); a value
            that contradicts the layer is corrected with a warning, as PEFT does.
        bias: which biases train: ``"none"``, ``"all"`` (every bias in the model), or
            ``"lora_only"`` (the biases of the wrapped layers).
        use_rslora: rank-stabilised scaling ``lora_alpha / sqrt(r)`` (Kalajdzievski, 2023).
        init_lora_weights: ``True``: A ~ kaiming-uniform, B = 0 (the update starts at zero).
            ``"gaussian"``: A ~ N(0, 1/r), B = 0. ``False``: both random (for tests: a non-zero update).

    Raises:
        MiniLoraError: for any value outside the ranges above.
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: Optional[Union[list[str], str]] = None
    fan_in_fan_out: Optional[bool] = None
    bias: str = "none"
    use_rslora: bool = False
    init_lora_weights: Union[bool, str] = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise MiniLoraError for any field outside its range (run at construction and by ``inject``,
        since a dataclass field can be changed after construction)."""
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise MiniLoraError(f"r must be a positive int (the rank of B A), got r={self.r!r}. Try r=8.")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) \
                or not math.isfinite(self.lora_alpha) or self.lora_alpha <= 0:
            raise MiniLoraError(
                f"lora_alpha must be a positive number, got lora_alpha={self.lora_alpha!r}. "
                "A common choice is lora_alpha = 2 * r or 4 * r."
            )
        if isinstance(self.lora_dropout, bool) or not isinstance(self.lora_dropout, (int, float)) \
                or not 0.0 <= self.lora_dropout < 1.0:
            raise MiniLoraError(
                f"lora_dropout must be in [0, 1), got lora_dropout={self.lora_dropout!r}. Use 0.0 for no dropout."
            )
        if not isinstance(self.bias, str) or self.bias not in BIAS_MODES:
            raise MiniLoraError(f"bias must be one of {BIAS_MODES}, got bias={self.bias!r}.")
        # Booleans are checked by type: "false" is a non-empty string, which Python reads as true,
        # and 1 == True; either would switch a feature on that the user meant off.
        if not isinstance(self.use_rslora, bool):
            raise MiniLoraError(f"use_rslora must be True or False (a bool), got use_rslora={self.use_rslora!r}.")
        if self.fan_in_fan_out is not None and not isinstance(self.fan_in_fan_out, bool):
            raise MiniLoraError(f"fan_in_fan_out must be None, True or False, got {self.fan_in_fan_out!r}.")
        if not (isinstance(self.init_lora_weights, bool) or self.init_lora_weights == "gaussian"):
            raise MiniLoraError(
                f"init_lora_weights must be True, False or 'gaussian', got {self.init_lora_weights!r}."
            )
        targets = self.target_modules
        if isinstance(targets, (set, tuple)):
            self.target_modules = targets = sorted(targets)
        if targets is not None and not isinstance(targets, str) and (
            not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t for t in targets)
        ):
            raise MiniLoraError(
                f"target_modules must be None, a non-empty list of module names, or a regex string, "
                f"got {targets!r}. For GPT-2 try target_modules=['c_attn']."
            )

    @property
    def scaling(self) -> float:
        """The factor in front of ``B A``: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)
