"""Putting LoRA into a model, and taking it out again.

``inject`` finds the target layers (PEFT's rules, in targets.py), checks everything, and only then
replaces each target with a ``LoraLinear`` that wraps it and freezes every parameter except the adapters. The reverse:
``merge_and_unload`` (fold ``dW`` into ``W0`` and put the plain layers back) and ``unload`` (put the
plain layers back and drop the adapters).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Iterator

from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import LoraConfig, MiniLoraError
from .layer import LoraLinear, check_autocast_adapter_dtype, in_out_features
from .saved_modules import (find_modules_to_save, mark_saved_modules_trainable, saved_modules, unwrap_saved_modules,
                            wrap_modules_to_save)
from .targets import find_targets, layer_rank_and_alpha
from .tied_config import update_tie_word_embeddings

CONFIGS_ATTRIBUTE = "minilora_configs"  # where inject leaves {adapter name: its LoraConfig} on the model
DEFAULT_ADAPTER = "default"  # the name of the first adapter, as in PEFT


def adapter_configs(model: nn.Module) -> dict[str, LoraConfig]:
    """The config of each adapter of ``model``, by adapter name, in the order they were added ({} if none)."""
    return getattr(model, CONFIGS_ATTRIBUTE, None) or {}


def adapter_config(model: nn.Module, adapter_name: str = DEFAULT_ADAPTER) -> LoraConfig | None:
    """The config adapter ``adapter_name`` was built from, or None if the model has no such adapter."""
    return adapter_configs(model).get(adapter_name)


def check_adapter_name(adapter_name: object) -> None:
    """An adapter name becomes part of parameter names (``lora_A.<name>.weight``): a non-empty str
    without dots, and not "__base__" (which means "no adapter" in a mixed batch, as in PEFT)."""
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name or adapter_name == "__base__":
        raise MiniLoraError(f"adapter_name={adapter_name!r}: an adapter name is a non-empty str without dots "
                            "(it becomes part of parameter names), and not '__base__'.")


def set_adapter_config(model: nn.Module, adapter_name: str, config: LoraConfig) -> None:
    """Record ``config`` as adapter ``adapter_name``'s (the dict is kept, so views of it stay current)."""
    if not hasattr(model, CONFIGS_ATTRIBUTE):
        setattr(model, CONFIGS_ATTRIBUTE, {})
    getattr(model, CONFIGS_ATTRIBUTE)[adapter_name] = config


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLinear]]:
    """(name, layer) for every LoraLinear in the model, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            yield name, module


def _replace_module(model: nn.Module, name: str, new_module: nn.Module) -> None:
    parent_name, _, child_name = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child_name, new_module)


def _check_fan_in_fan_out(name: str, base_layer: nn.Module, config: LoraConfig) -> None:
    """Warn, as PEFT does, when the config's fan_in_fan_out contradicts the layer's weight layout, and
    set the config's to the layer's, as PEFT does (so the config ends with the last new layer's layout,
    and the next contradicting layer warns again). ``None`` (minilora's default) means "each layer's own"."""
    actual = isinstance(base_layer, Conv1D)
    if config.fan_in_fan_out is not None and config.fan_in_fan_out != actual:
        kind = "Conv1D" if actual else "torch.nn.Linear"
        warnings.warn(
            f"fan_in_fan_out is set to {config.fan_in_fan_out} but the target module {name!r} is `{kind}`. "
            f"Setting fan_in_fan_out to {actual}.",
            stacklevel=3,
        )
        config.fan_in_fan_out = actual


def inject(model: nn.Module, config: LoraConfig, adapter_name: str = DEFAULT_ADAPTER,
           autocast_adapter_dtype: bool = True) -> nn.Module:
    """Wrap every target layer of ``model`` in a LoraLinear, in place, and freeze the rest.

    The adapter is kept under ``adapter_name`` (more can be added: minilora.add_adapter).
    In a float16 / bfloat16 model A and B are float32 (``autocast_adapter_dtype=True``, PEFT's
    default), or in the model's dtype with ``autocast_adapter_dtype=False``.

    After this only ``lora_A`` and ``lora_B`` (and biases, per ``config.bias``) require grad.
    Layers are wrapped in ``model.named_modules()`` order, the order PEFT uses, so the same seed
    draws the same adapter weights as ``peft.get_peft_model``.

    Returns:
        the same ``model`` object.

    Raises:
        MiniLoraError: before anything is changed, if the model already has LoRA layers, a config
            field is out of range, the target regex is invalid, or a target matches nothing or is
            not linear.
    """
    if not isinstance(config, LoraConfig):
        raise MiniLoraError(f"inject needs a minilora.LoraConfig, got {type(config).__name__}.")
    if any(True for _ in lora_layers(model)):
        raise MiniLoraError(
            "This model already has minilora layers; wrapping them again would stack adapters. "
            "Use the model as it is, or call minilora.unload(model) first."
        )
    check_adapter_name(adapter_name)
    check_autocast_adapter_dtype(autocast_adapter_dtype)
    config.validate()  # its fields may have been changed since it was built
    names = find_targets(model, config)
    to_save = find_modules_to_save(model, config.modules_to_save, names)  # trained in full (saved_modules.py)
    check_adapter_size(model, names, max(layer_rank_and_alpha(name, config)[0] for name in names))

    # Build every new layer before changing the model, so that nothing is half-done if one fails.
    new_layers = build_adapter(model, config, adapter_name, names, autocast_adapter_dtype)
    _note_tied_weights(model, new_layers)
    for name, layer in new_layers.items():
        _replace_module(model, name, layer)
    mark_only_lora_as_trainable(model, config.bias)
    wrap_modules_to_save(model, to_save, adapter_name)  # after freezing, as PEFT: the copies train, the originals do not
    setattr(model, CONFIGS_ATTRIBUTE, {adapter_name: config})
    return model


def build_adapter(model: nn.Module, config: LoraConfig, adapter_name: str, names: list[str],
                  autocast_adapter_dtype: bool = True) -> dict[str, LoraLinear]:
    """Adapter ``adapter_name`` for each target in ``names``: a new LoraLinear around a plain layer
    (returned, for the caller to put in place), or a new entry in a layer that is a LoraLinear already.

    A and B are drawn from the RNG in ``names`` (named_modules()) order, as PEFT does.
    """
    new_layers = {}
    for name in names:
        module = model.get_submodule(name)
        r, lora_alpha = layer_rank_and_alpha(name, config)  # rank_pattern / alpha_pattern, else r / lora_alpha
        options = dict(lora_dropout=config.lora_dropout, use_rslora=config.use_rslora,
                       init_lora_weights=config.init_lora_weights, autocast_adapter_dtype=autocast_adapter_dtype,
                       lora_bias=config.lora_bias)
        if isinstance(module, LoraLinear):  # a layer that holds other adapters already
            module.add_adapter(adapter_name, r, lora_alpha, **options)
            continue
        _check_fan_in_fan_out(name, module, config)
        new_layers[name] = LoraLinear(module, r=r, lora_alpha=lora_alpha, adapter_name=adapter_name, **options)
        # A new module starts in train mode; take the mode of the layer it replaces instead, so
        # that lora_dropout stays off in a model that was put in eval mode before inject.
        # (PEFT leaves its new layers in train mode even inside an eval model.)
        new_layers[name].train(module.training)
    return new_layers


def _note_tied_weights(model: nn.Module, new_layers: dict[str, LoraLinear]) -> None:
    """A target whose weight is shared with another module (GPT-2's lm_head is tied to the input
    embedding wte) must not be merged in place: W0 + dW would change the embedding too. Each such layer
    records what it shares its weight with (``LoraLinear.tied_to``; merge unties it), and one warning
    says so, as PEFT warns."""
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    tied = {}
    for name, layer in new_layers.items():
        others = [other for other in owners.get(id(layer.base_layer.weight), []) if other != f"{name}.weight"]
        if others:
            layer.tied_to = others
            tied[name] = others
    if tied:
        warnings.warn(
            f"The weights of target modules {sorted(tied)} are tied to {sorted(sum(tied.values(), []))} (e.g. "
            "tie_word_embeddings=True). The adapter changes only the target's output; merging gives the target a "
            "weight of its own (untied, with a warning) so that merged outputs equal unmerged ones.",
            stacklevel=3,
        )


def check_adapter_size(model: nn.Module, names: list[str], r: int) -> None:
    """Refuse an r whose A and B would not fit in memory (say r=2**40) before allocating any of them."""
    numbers = sum(r * sum(in_out_features(model.get_submodule(name))) for name in names)  # r * (in + out)
    weight = model.get_submodule(names[0]).weight
    nbytes = numbers * max(weight.element_size(), 4)  # half-precision bases get float32 adapters
    available = _memory_bytes(weight.device)
    if nbytes > available:
        smallest = min(min(in_out_features(model.get_submodule(name))) for name in names)
        raise MiniLoraError(
            f"r={r} would need {nbytes / 2**30:,.1f} GiB for A and B of {len(names)} layers, more than the "
            f"{available / 2**30:,.1f} GiB of memory on {weight.device}. Pick a smaller r: LoRA's r is usually 4 to "
            f"64, and B A cannot have a rank above min(in, out) = {smallest} here."
        )


def _memory_bytes(device) -> int:
    """Total memory of ``device`` (physical memory for the CPU), or a very large number if unknown."""
    try:
        if device.type == "cuda":
            import torch

            return torch.cuda.mem_get_info(device)[1]
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError, RuntimeError):
        return 2**62


def is_lora_parameter(name: str) -> bool:
    """True for the parameter (or state_dict key) names of an adapter: ``....lora_A.<adapter>.weight`` / ``lora_B``."""
    return ".lora_A." in f".{name}" or ".lora_B." in f".{name}"


def mark_only_lora_as_trainable(model: nn.Module, bias: str = "none") -> None:
    """requires_grad = True for lora_A / lora_B of the active adapters (and biases per ``bias``), False for all else."""
    for param in model.parameters():
        param.requires_grad_(False)
    for _, layer in lora_layers(model):
        layer.set_adapter(layer.active_adapters)  # the active adapters' A and B train
    mark_biases_trainable(model, bias)
    mark_saved_modules_trainable(model)  # modules_to_save: the copies train, the originals stay frozen


def mark_biases_trainable(model: nn.Module, bias: str) -> None:
    """PEFT's ``bias``: "all" trains every bias in the model, "lora_only" the biases of the adapted
    layers, "none" none (nothing is frozen here)."""
    if bias == "all":
        for name, param in model.named_parameters():
            if name == "bias" or name.endswith(".bias"):
                param.requires_grad_(True)
    elif bias == "lora_only":
        for _, layer in lora_layers(model):
            if getattr(layer.base_layer, "bias", None) is not None:
                layer.base_layer.bias.requires_grad_(True)


def merge(model: nn.Module, safe: bool = False, adapter_names: list[str] | None = None) -> None:
    """Merge every LoRA layer: W0 <- W0 + scaling * B A. Adapters already merged are left as they are.

    Args:
        safe: check every layer's merged weight is finite before merging any, so that a broken
            adapter raises MiniLoraError and leaves the whole model as it was.
        adapter_names: which adapters to fold in; None means the active ones.
    """
    layers = require_lora_layers(model, "merge")
    check_mergeable(layers, adapter_names, safe)
    for _, layer in layers:
        if _unmerged_active(layer, adapter_names):
            layer.merge(safe=safe, adapter_names=_unmerged_active(layer, adapter_names))


def unmerge(model: nn.Module) -> None:
    """Undo ``merge`` on every merged LoRA layer: W0 <- W0 - scaling * B A."""
    for _, layer in require_lora_layers(model, "unmerge"):
        if layer.merged:
            layer.unmerge()


def merge_and_unload(model: nn.Module, safe: bool = False, adapter_names: list[str] | None = None) -> nn.Module:
    """Fold each adapter into its base layer and put the plain base layers back.

    The result has the original module types (nn.Linear / Conv1D) with ``W0 + dW`` and gives the
    adapted model's outputs without any LoRA code. Returns the same model object.

    Args:
        adapter_names: which adapters to fold in (PEFT's argument); None means the active ones.
    """
    layers = require_lora_layers(model, "merge_and_unload")
    unknown = [name for name in adapter_names or [] if name not in adapter_configs(model)]
    if isinstance(adapter_names, str) or unknown:
        raise MiniLoraError(f"merge_and_unload: adapter_names must be a list of the model's adapters "
                            f"{list(adapter_configs(model))}, got {adapter_names!r}.")
    check_mergeable(layers, adapter_names, safe)
    for name, layer in layers:
        if _unmerged_active(layer, adapter_names):
            layer.merge(safe=safe, adapter_names=_unmerged_active(layer, adapter_names))
        _give_back_own_storage(layer)
        _replace_module(model, name, layer.base_layer)
    unwrap_saved_modules(model, keep="trained")  # modules_to_save: the trained copies stay, as in PEFT
    update_tie_word_embeddings(model)  # lm_head no longer the input embedding's weight: the config says so
    _forget_config(model)
    return model


def _warn_if_biases_trained(model: nn.Module, action: str) -> None:
    """With bias="all" / "lora_only" the biases train in place (they belong to the base model), so
    switching the adapters off cannot give the base model's outputs back. PEFT warns the same."""
    modes = sorted({config.bias for config in adapter_configs(model).values() if config.bias != "none"})
    for bias in modes:
        warnings.warn(f"Careful, {action} with bias configured to be '{bias}' does not produce the same output as "
                      "the base model would without adaption: the biases trained in place and are not restored.",
                      stacklevel=3)


def unload(model: nn.Module, unmerge: bool = True) -> nn.Module:
    """Put the plain base layers back and drop the adapters (merged ones are unmerged first).

    Returns the same model object, with the base model's outputs; with ``bias="all"`` or
    ``"lora_only"`` the biases that trained stay as trained (a warning says so). ``unmerge=False``
    is PEFT's ``unload``: a merged layer goes back as it is, W0 + dW (compat_adapters.py).
    """
    _warn_if_biases_trained(model, "unload()")
    for name, layer in require_lora_layers(model, "unload"):
        if layer.merged and unmerge:
            layer.unmerge()
        _give_back_own_storage(layer)
        _replace_module(model, name, layer.base_layer)
    unwrap_saved_modules(model, keep="original")  # modules_to_save: the base model's own modules come back
    _forget_config(model)
    return model


def _give_back_own_storage(layer: LoraLinear) -> None:
    """After the fused path W0 and its bias are views of the [W0; A] buffer (minilora/fused.py): the plain
    layer that goes back into the model gets contiguous storage of its own, without A's rows."""
    from .fused import release_concatenated_weight  # (fused.py imports this module)

    release_concatenated_weight(layer)


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model gives the base model's outputs; the adapters come back on exit.

    With ``bias="all"`` or ``"lora_only"`` the biases trained in place and stay on: a warning says
    the outputs are not the base model's.

    Raises:
        MiniLoraError: if a layer is merged (its W0 already holds dW): call ``unmerge`` first.
    """
    layers = require_lora_layers(model, "disabled")
    _warn_if_biases_trained(model, "disabling adapter layers")
    merged = [name for name, layer in layers if layer.merged]
    if merged:
        raise MiniLoraError(
            f"disabled() cannot switch off merged layers ({merged[:3]}...): their W0 already holds dW. "
            "Call minilora.unmerge(model) first."
        )
    switches = [layer for _, layer in layers] + [wrapper for _, wrapper in saved_modules(model)]
    previous = [switch.disabled for switch in switches]
    for switch in switches:
        switch.disabled = True  # LoRA layers: W0 x only; modules_to_save: the original modules
    try:
        yield model
    finally:
        for switch, was_disabled in zip(switches, previous):
            switch.disabled = was_disabled


def require_lora_layers(model: nn.Module, action: str) -> list[tuple[str, LoraLinear]]:
    """The model's (name, LoraLinear) pairs; MiniLoraError naming ``action`` if it has none."""
    layers = list(lora_layers(model))
    if not layers:
        raise MiniLoraError(f"{action}: this model has no minilora layers. Call minilora.inject(model, config) first.")
    return layers


def _unmerged_active(layer: LoraLinear, adapter_names: list[str] | None = None) -> list[str]:
    """The layer's adapters named (default: its active ones) whose dW is not in W0 yet."""
    names = layer.active_adapters if adapter_names is None else adapter_names
    return [name for name in names if name in layer.lora_A and name not in layer.merged_adapters]


def check_mergeable(layers: list[tuple[str, LoraLinear]], adapter_names: list[str] | None = None,
                     safe: bool = False) -> None:
    """Raise before anything changes if an adapter to merge has lora_bias on a layer without a bias, or
    (``safe``) if any layer's W0 + dW or bias b0 + s b (of the adapters to merge) would hold NaN or inf."""
    for name, layer in layers:
        todo = _unmerged_active(layer, adapter_names)
        layer.check_bias_mergeable(todo)
        if not safe:
            continue
        merged, merged_bias = layer.base_layer.weight.detach().clone(), layer.base_layer.bias
        for adapter in todo:  # one after the other, as PEFT's safe_merge folds them in
            merged += layer.delta_weight(adapter).detach().to(merged.dtype)
            if layer.lora_bias[adapter]:
                merged_bias = merged_bias + layer.lora_B[adapter].bias.detach() * layer.scaling[adapter]
            if not bool(merged.isfinite().all()) or (layer.lora_bias[adapter] and not bool(merged_bias.isfinite().all())):
                raise MiniLoraError(
                    f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken (PEFT's words): "
                    f"W0 + dW of {name!r} has NaN or inf values (check the loss during training). Nothing was merged."
                )


def _forget_config(model: nn.Module) -> None:
    if hasattr(model, CONFIGS_ATTRIBUTE):
        delattr(model, CONFIGS_ATTRIBUTE)
