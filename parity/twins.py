"""Twins: one base model, two adapted copies (minilora and PEFT) with the same adapter weights.

Everything that compares minilora with PEFT (the parity checks, the tests, the benchmarks) starts
here, so the two sides are always built the same way. Works with PEFT releases from 0.6 on: a
config field a release does not know is left out only when it has its default value.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

import torch
from torch import nn

import minilora
from minilora.inject import is_lora_parameter

PEFT_PREFIX = "base_model.model."
PEFT_ADAPTER = "default"


class UnsupportedByPeft(RuntimeError):
    """The installed PEFT release cannot express this configuration (e.g. use_rslora before 0.8)."""


def peft_config(config: minilora.LoraConfig, **overrides: Any):
    """The ``peft.LoraConfig`` that asks PEFT for what ``config`` asks minilora for."""
    import peft

    fields = dict(
        r=config.r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.target_modules,  # None: PEFT's own default for the architecture
        bias=config.bias,
        use_rslora=config.use_rslora,
        init_lora_weights=config.init_lora_weights,
        fan_in_fan_out=bool(config.fan_in_fan_out),
    )
    fields.update(overrides)
    known = inspect.signature(peft.LoraConfig).parameters
    defaults = {"use_rslora": False, "init_lora_weights": True}
    for name in list(fields):
        if name not in known:
            if fields[name] != defaults.get(name, object()):
                raise UnsupportedByPeft(f"peft {peft.__version__} has no LoraConfig.{name}")
            del fields[name]
    return peft.LoraConfig(**fields)


def peft_key(minilora_key: str) -> str:
    """``h.0.attn.c_attn.lora_A.default.weight`` -> ``base_model.model.h.0.attn.c_attn.lora_A.default.weight``.

    minilora's in-memory names are PEFT's; only PEFT's wrapper adds ``base_model.model.``.
    """
    return PEFT_PREFIX + minilora_key


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA weights of a minilora model, by minilora key."""
    return {k: v for k, v in model.state_dict().items() if is_lora_parameter(k)}


def copy_adapters_to_peft(minilora_model: nn.Module, peft_model: nn.Module) -> None:
    """Give the PEFT model exactly the minilora model's adapter weights."""
    target = peft_model.state_dict()
    with torch.no_grad():
        for key, value in adapter_state(minilora_model).items():
            target[peft_key(key)].copy_(value)


def randomize_adapters(model: nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Draw non-zero A and B (B = 0 at init would hide any error in the update)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in minilora.lora_layers(model):
            for weight in (*layer.lora_A.parameters(), *layer.lora_B.parameters()):
                weight.copy_(torch.randn(weight.shape, generator=generator, dtype=torch.float64) * std)


def make_twins(base: nn.Module, config: minilora.LoraConfig, seed: int = 0,
               random_b: bool = True) -> tuple[nn.Module, nn.Module]:
    """(minilora_model, peft_model): deep copies of ``base``, each given LoRA from the same seed.

    With ``random_b`` the adapters get equal non-zero weights (see ``randomize_adapters``), so the
    update is visible in every output; otherwise each keeps its own same-seed init.
    """
    import peft

    mini = copy.deepcopy(base)
    twin = copy.deepcopy(base)
    torch.manual_seed(seed)
    minilora.inject(mini, config)
    torch.manual_seed(seed)
    try:
        twin = peft.get_peft_model(twin, peft_config(config))
    except AttributeError as error:  # PEFT 0.3 reads model.config, which only transformers models have
        if hasattr(base, "config") or "config" not in str(error):
            raise
        raise UnsupportedByPeft(f"peft {peft.__version__} adapts transformers models only (it reads "
                                "model.config); plain nn.Modules from 0.4") from error
    if random_b:
        randomize_adapters(mini, seed)
        copy_adapters_to_peft(mini, twin)
    mini.train(base.training)
    twin.train(base.training)
    return mini, twin


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b|, computed in float64."""
    return (a.double() - b.double()).abs().max().item()


def largest(values) -> float:
    """max(values), NaN if any is NaN (max() keeps a number over a NaN that follows it)."""
    values = list(values)
    return float("nan") if any(value != value for value in values) else max(values)


def max_rel_diff(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-12) -> float:
    """max |a - b| / max |b|: one relative number per tensor, robust to entries near zero."""
    return max_abs_diff(a, b) / max(b.double().abs().max().item(), eps)
