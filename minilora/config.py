"""LoraConfig: what to adapt and how, with PEFT's field names and defaults.

A LoRA adapter replaces a frozen layer ``h = W0 x`` by ``h = W0 x + (alpha / r) B A x``, where
``A`` is (r, in) and ``B`` is (out, r). The config says which layers get an adapter
(``target_modules``) and the numbers in that formula (``r``, ``lora_alpha``, ...).

Every field is checked when the config is built, so a bad value fails here, long before a model
is touched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Union

from .peft_attributes import PeftConfigAttributes


class MiniLoraError(ValueError):
    """The one error minilora raises for bad input. The message says what was wrong and what to do.

    A message that quotes a huge value whole (a megabyte-long target_modules from a hostile file) keeps its
    first and last ``MAX_MESSAGE // 2`` characters, what was wrong and what to do, and leaves out the middle.
    """

    MAX_MESSAGE = 4000

    def __init__(self, message: object = "", *args: object) -> None:
        if isinstance(message, str) and len(message) > self.MAX_MESSAGE:
            half = self.MAX_MESSAGE // 2
            message = f"{message[:half]} ... ({len(message) - 2 * half} characters left out) ... {message[-half:]}"
        super().__init__(message, *args)


ALL_LINEAR = "all-linear"  # PEFT's shorthand: every linear layer except the output layer

BIAS_MODES = ("none", "all", "lora_only")


@dataclass
class LoraConfig(PeftConfigAttributes):
    """Which layers get LoRA, and with which numbers. Field names and defaults follow PEFT.

    (The base class adds what PEFT's code reads on a config: ``peft_type``, ``to_dict``,
    ``save_pretrained`` / ``from_pretrained``; see peft_attributes.py.)

    Args:
        r: rank of the update ``B A``; ``A`` is (r, in), ``B`` is (out, r). A positive int.
        lora_alpha: the update is scaled by ``lora_alpha / r`` (or ``lora_alpha / sqrt(r)`` with
            ``use_rslora``), so changing ``r`` does not change the update's size at init.
        lora_dropout: dropout applied to the adapter's input only (not to ``W0 x``); in [0, 1).
        target_modules: which modules to wrap. ``None``: PEFT's default for the architecture
            (``["c_attn"]`` for GPT-2, ``["q_proj", "v_proj"]`` for Llama; see minilora/targets.py).
            A list: module names or name suffixes (``"c_attn"`` matches ``"transformer.h.0.attn.c_attn"``).
            A string: a regex that must match the full name. ``"all-linear"``: every nn.Linear /
            Conv1D except the output layer.
        fan_in_fan_out: True when the base weight is stored (in, out) as in GPT-2's Conv1D.
            ``None`` lets minilora decide per layer (True for Conv1D, False for nn.Linear); a value
            that contradicts the layer is corrected with a warning, as PEFT does.
        bias: which biases train: ``"none"``, ``"all"`` (every bias in the model), or
            ``"lora_only"`` (the biases of the wrapped layers).
        use_rslora: rank-stabilised scaling ``lora_alpha / sqrt(r)`` (Kalajdzievski, 2023).
        init_lora_weights: ``True``: A ~ kaiming-uniform, B = 0 (the update starts at zero).
            ``"gaussian"``: A ~ N(0, 1/r), B = 0. ``False``: both random (for tests: a non-zero update).
        exclude_modules: modules never wrapped, by the same rule as ``target_modules`` (list or regex).
        layers_to_transform: only blocks with these indices (an int or a list of ints) get LoRA;
            list ``target_modules`` only. The index is the number after ``layers_pattern``
            (e.g. ``"layers"`` in ``model.layers.3.mlp``), or the first number after two name parts.
        layers_pattern: the name part(s) before the block index (a str or a list of str).
        rank_pattern: ``{regex: r}``: a layer whose name ends (on a dot) with a match of the regex
            gets that r instead of ``r``; the first matching key wins, as in PEFT.
        alpha_pattern: ``{regex: lora_alpha}``, by the same rule.
        modules_to_save: modules trained in full and saved with the adapter (e.g. ``["classifier"]``
            for a new classification head): every module whose full name ends with an entry. See
            minilora/saved_modules.py.
        lora_bias: give ``B`` a trainable bias ``b`` too: the update becomes ``scaling * (B A x + b)``,
            and merging adds ``scaling * b`` to the base layer's bias (which it must have). ``b``
            starts at zero (random with ``init_lora_weights=False``); as in PEFT, it works with
            ``init_lora_weights`` True or False only.

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
    exclude_modules: Optional[Union[list[str], str]] = None
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    modules_to_save: Optional[list[str]] = None
    lora_bias: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise MiniLoraError for any field outside its range (run at construction and by ``inject``,
        since a dataclass field can be changed after construction)."""
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise MiniLoraError(f"r must be a positive int (the rank of B A), got r={self.r!r}. Try r=8.")
        if not _is_alpha(self.lora_alpha):
            raise MiniLoraError(
                f"lora_alpha must be a positive number (finite as a float), got lora_alpha={self.lora_alpha!r}. "
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
        if not isinstance(self.lora_bias, bool):
            raise MiniLoraError(f"lora_bias must be True or False (a bool), got lora_bias={self.lora_bias!r}.")
        if self.lora_bias and self.init_lora_weights not in (True, False):
            raise MiniLoraError(f"The argument lora_bias=True is only supported with init_lora_weights=True or False, "
                                f"got init_lora_weights={self.init_lora_weights} instead. (PEFT's rule and words.) "
                                "Use init_lora_weights=True (the default) with lora_bias=True, or leave lora_bias=False.")
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
        self._validate_selectors()

    def _validate_selectors(self) -> None:
        """PEFT's narrowing selectors and per-layer patterns (the rules of peft.LoraConfig.__post_init__)."""
        exclude = self.exclude_modules
        if isinstance(exclude, (set, tuple)):
            self.exclude_modules = exclude = sorted(exclude)
        if exclude is not None and not isinstance(exclude, str) and (
                not isinstance(exclude, list) or not all(isinstance(e, str) and e for e in exclude)):
            raise MiniLoraError(f"exclude_modules must be None, a list of module names or a regex string, got "
                                f"{exclude!r}.")
        saved = self.modules_to_save
        if isinstance(saved, (set, tuple)):
            self.modules_to_save = saved = sorted(saved)
        if saved is not None and (not isinstance(saved, list) or not all(isinstance(m, str) and m for m in saved)):
            raise MiniLoraError(f"modules_to_save must be None or a list of module names, got {saved!r}. "
                                "Try modules_to_save=['classifier'].")
        layers = self.layers_to_transform
        if isinstance(layers, tuple):
            self.layers_to_transform = layers = list(layers)
        if layers is not None and not _is_index(layers) and not (
                isinstance(layers, list) and all(_is_index(i) for i in layers)):
            raise MiniLoraError(f"layers_to_transform must be None, a layer index or a list of indices (ints >= 0), "
                                f"got {layers!r}.")
        pattern = self.layers_pattern
        if pattern is not None and not isinstance(pattern, str) and (
                not isinstance(pattern, list) or not all(isinstance(p, str) for p in pattern)):
            raise MiniLoraError(f"layers_pattern must be None, a name part such as 'layers', or a list of them, got "
                                f"{pattern!r}.")
        for name, value in (("layers_to_transform", layers), ("layers_pattern", pattern)):  # (PEFT's words first)
            if isinstance(self.target_modules, str) and value is not None:
                raise MiniLoraError(f"`{name}` cannot be used when `target_modules` is a str. layers_to_transform and "
                                    "layers_pattern work with a list of target_modules only (as in PEFT), not with "
                                    f"the string {self.target_modules!r}. Put the layer index in the regex instead, "
                                    "or pass a list of names.")
        if pattern and layers is None:
            raise MiniLoraError("When `layers_pattern` is specified, `layers_to_transform` must also be specified. "
                                f"layers_pattern={pattern!r} needs layers_to_transform (the indices to keep), as in "
                                "PEFT.")
        from .bounded_regex import compile_error, short  # (it imports MiniLoraError from here)

        for name, patterns, check, what in (("rank_pattern", self.rank_pattern, _is_rank, "a positive int"),
                                            ("alpha_pattern", self.alpha_pattern, _is_alpha,
                                             "a positive number (finite as a float)")):
            if not isinstance(patterns, dict):
                raise MiniLoraError(f"{name} must be a dict {{layer-name regex: value}}, got {patterns!r}.")
            for key, value in patterns.items():
                if not isinstance(key, str) or not key:
                    raise MiniLoraError(f"{name} keys are layer-name regexes (non-empty strings), got {key!r}.")
                error = compile_error(key)
                if error:
                    raise MiniLoraError(f"{name} key {short(key)} is not a valid regex ({error}).")
                if not check(value):
                    raise MiniLoraError(f"{name}[{key!r}] must be {what}, got {value!r}.")

    @property
    def scaling(self) -> float:
        """The factor in front of ``B A``: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


def _is_index(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_rank(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_alpha(value: object) -> bool:
    """A positive number that a float holds (an int beyond 1.8e308 overflows in ``lora_alpha / r``)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value) and value > 0
    except OverflowError:  # math.isfinite(10**400)
        return False
