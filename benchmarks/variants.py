"""The variants: one model per way of computing the same thing, all with the same adapter weights.

Every LoRA variant gets the same non-zero adapter (``parity.twins.randomize_adapters``: with the
initial B = 0 a broken update would go unnoticed), so each one's outputs can be checked against
minilora's reference path before it is timed.
"""

from __future__ import annotations

import copy
import math
from typing import Callable

import torch
from torch import nn

import minilora
from parity.twins import adapter_state, copy_adapters_to_peft, peft_config, randomize_adapters

TOLERANCE = 1e-5  # float32, relative to the reference (max |diff| / max |reference|)


def load_base(kind: str, device: str) -> nn.Module:
    """The bare model in eval mode: the embedded GPT-2 small, or a 2-layer one for tests.

    GPT-2's own dropouts (embeddings, attention, residual) are set to p = 0, so that in the training
    step the only randomness is the lora_dropout being measured, and variants that draw random
    numbers differently (torch.compile) can still be checked against the reference.
    """
    if kind == "tiny":
        model = minilora.models.tiny_gpt2(n_head=4, n_positions=64, vocab_size=96,
                                          bos_token_id=0, eos_token_id=0).to(device)
    else:
        model = minilora.load_model(device=device)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
        setattr(model.config, name, 0.0)
    return model


def lora_config(targets: tuple, r: int, dropout: float, alpha_per_r: float) -> minilora.LoraConfig:
    return minilora.LoraConfig(r=r, lora_alpha=alpha_per_r * r, lora_dropout=dropout,
                               target_modules=list(targets), fan_in_fan_out=True)


def adapter_weights(base: nn.Module, config: minilora.LoraConfig, seed: int) -> dict[str, torch.Tensor]:
    """The one random adapter every variant of a case gets, by minilora key."""
    model = copy.deepcopy(base)
    minilora.inject(model, config)
    randomize_adapters(model, seed=seed)
    weights = {k: v.clone() for k, v in adapter_state(model).items()}
    del model
    return weights


def minilora_model(base: nn.Module, config: minilora.LoraConfig, weights: dict, path: str,
                   concatenate: bool = True) -> nn.Module:
    model = minilora.inject(copy.deepcopy(base), config)
    model.load_state_dict(weights, strict=False)
    return minilora.set_forward_path(model, path, concatenate=concatenate)


def peft_model(base: nn.Module, config: minilora.LoraConfig, weights: dict, merged: bool) -> nn.Module:
    import peft

    carrier = minilora.inject(copy.deepcopy(base), config)  # only to carry the weights across
    carrier.load_state_dict(weights, strict=False)
    model = peft.get_peft_model(copy.deepcopy(base), peft_config(config))
    copy_adapters_to_peft(carrier, model)
    del carrier
    if merged:
        model.merge_adapter()  # W0 + dW in place; the LoRA layers stay, skipped in forward
    return model.train(base.training)


def compile_model(model: nn.Module) -> nn.Module:
    """torch.compile of the model (default inductor backend; errors surface on the first call)."""
    return torch.compile(model)


def build_variant(name: str, base: nn.Module, config: minilora.LoraConfig, weights: dict) -> nn.Module:
    """One variant's model. ``compiled`` is the reference path under torch.compile; ``fused-addmm`` is
    the fused path without the concatenated weight (what it does in training, also at inference).

    ``base`` is a copy too, so that base and every variant have memory allocated the same way (the
    model as loaded had the A/A control at 0.95 on a 2-core CPU). The A/A controls are identical copies of a variant in memory of their own: ``base-copy`` of the
    base model (inference tables), ``peft-copy`` of the PEFT model (training tables, whose ratios
    are to PEFT). The method should find them at 1.00; how far it does not is its own error.
    """
    builders: dict[str, Callable[[], nn.Module]] = {
        "base": lambda: copy.deepcopy(base),
        "base-copy": lambda: copy.deepcopy(base),
        "peft": lambda: peft_model(base, config, weights, merged=False),
        "peft-copy": lambda: peft_model(base, config, weights, merged=False),
        "peft-merged": lambda: peft_model(base, config, weights, merged=True),
        "reference": lambda: minilora_model(base, config, weights, "reference"),
        "merged": lambda: minilora_model(base, config, weights, "merged"),
        "fused": lambda: minilora_model(base, config, weights, "fused"),
        "fused-addmm": lambda: minilora_model(base, config, weights, "fused", concatenate=False),
        "compiled": lambda: compile_model(minilora_model(base, config, weights, "reference")),
    }
    if name not in builders:
        raise ValueError(f"unknown variant {name!r}; known: {sorted(builders)}")
    return builders[name]()


def relative_difference(actual, expected) -> float:
    """max |a - b| / max |b| over one tensor or matching lists of tensors (float64); NaN if any is NaN
    (compare with ``not difference <= TOLERANCE``: NaN > TOLERANCE is False)."""
    if isinstance(expected, (list, tuple)):
        differences = [relative_difference(a, b) for a, b in zip(actual, expected, strict=True)]
        return math.nan if any(math.isnan(d) for d in differences) else max(differences, default=0.0)
    scale = max(expected.double().abs().max().item(), 1e-12)
    return (actual.double() - expected.double()).abs().max().item() / scale
