"""PEFT's functions on state dicts and bare models, for scripts that use them instead of the wrapper:

    from minilora.compat import (get_peft_model_state_dict, set_peft_model_state_dict,
                                 inject_adapter_in_model, get_base_model_state_dict, set_base_model_state_dict)

    state = get_peft_model_state_dict(peft_model)       # the adapter's tensors, PEFT's file keys
    set_peft_model_state_dict(peft_model, state)        # and back (strictly: every key must fit)
    model = inject_adapter_in_model(config, model)      # LoRA layers in place, no wrapper
    base = get_base_model_state_dict(peft_model)        # your model's own keys, without the adapters

Each takes a compat ``PeftModel``, its ``base_model``, or a model with minilora layers in it, and
does its work with adapters.py / inject.py; keys and values are PEFT's.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Mapping, Optional

import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from . import adapters
from .compat_config import resolved_targets
from .compat_loading import adapter_on_meta, drawing_nothing, leave_new_layers_in_train_mode
from .compat_tying import check_tied_modules
from .config import LoraConfig, MiniLoraError
from .inject import inject, is_lora_parameter, lora_layers
from .targets import find_targets

WRAPPER_PREFIX = "base_model.model."  # what PEFT's wrappers put in front of your model's keys


def model_inside(model: nn.Module) -> nn.Module:
    """Your model, from a PeftModel (``base_model.model``), a LoraModel (``model``) or itself."""
    if hasattr(model, "get_base_model") and hasattr(model, "base_model") and hasattr(model.base_model, "model"):
        return model.get_base_model()
    if type(model).__name__ == "LoraModel" and isinstance(getattr(model, "model", None), nn.Module):
        return model.model
    return model


def get_peft_model_state_dict(model: nn.Module, state_dict: Optional[Mapping[str, torch.Tensor]] = None,
                              adapter_name: str = "default", unwrap_compiled: bool = False,
                              save_embedding_layers: Any = "auto") -> dict[str, torch.Tensor]:
    """The tensors of adapter ``adapter_name`` under PEFT's file keys (``base_model.model.<layer>.lora_A.weight``:
    no adapter name), as ``save_pretrained`` writes them. ``state_dict`` (the wrapper's keys or your
    model's) supplies the values, as with DeepSpeed or FSDP. ``save_embedding_layers`` ("auto", True,
    False) adds the embedding layers' own weights where PEFT does, with its warnings (saved_embeddings.py)."""
    if unwrap_compiled:
        model = getattr(model, "_orig_mod", model)
    if state_dict is not None:
        state_dict = {key.removeprefix(WRAPPER_PREFIX): value for key, value in state_dict.items()}
    tensors = adapters.adapter_state_dict(model_inside(model), state_dict, adapter_name, save_embedding_layers)
    return {_key_prefix(model) + key.removeprefix(WRAPPER_PREFIX): value for key, value in tensors.items()}


def _key_prefix(model: nn.Module) -> str:
    """PEFT's keys are those of the object passed: ``base_model.model.<layer>`` for a PeftModel,
    ``model.<layer>`` for a LoraModel, ``<layer>`` for your own model (after inject_adapter_in_model)."""
    if model_inside(model) is model:
        return ""
    return "model." if type(model).__name__ == "LoraModel" else WRAPPER_PREFIX


def set_peft_model_state_dict(model: nn.Module, peft_model_state_dict: Mapping[str, torch.Tensor],
                              adapter_name: str = "default", ignore_mismatched_sizes: bool = False,
                              low_cpu_mem_usage: bool = False) -> _IncompatibleKeys:
    """Load an adapter's tensors (PEFT's keys, as ``get_peft_model_state_dict`` gives them) into the
    existing adapter ``adapter_name``. Strict: every key must fit, or MiniLoraError before anything
    changes, so the returned missing / unexpected keys are empty. requires_grad stays as it was."""
    if ignore_mismatched_sizes:
        raise MiniLoraError("ignore_mismatched_sizes=True would leave tensors of another shape unloaded; minilora "
                            "loads strictly. Load an adapter made for this model.")
    prefix = _key_prefix(model)  # (the keys get_peft_model_state_dict gives for this object)
    bare = sorted(key for key in peft_model_state_dict if not str(key).startswith(prefix))
    if bare:  # PEFT reports them as unexpected and loads nothing for them
        raise MiniLoraError(f"set_peft_model_state_dict: keys {bare[:4]}{' ...' if len(bare) > 4 else ''} do not start "
                            f"with {prefix!r}, as the keys of this {type(model).__name__} do (PEFT would not load "
                            "them). Pass the keys get_peft_model_state_dict gives for the same object.")
    inner = model_inside(model)
    trainable = {name: param.requires_grad for name, param in inner.named_parameters()}  # by name: to_empty
    # below makes new Parameter objects
    placeholders = _meta_adapter(inner, adapter_name)  # from inject_adapter_in_model(..., low_cpu_mem_usage=True)
    for matrix, device in placeholders:
        matrix.to_empty(device=device)  # real memory for load_adapter to fill (every key, or it raises)
    tensors = {(key.removeprefix(prefix) if prefix == "model." else key): value
               for key, value in peft_model_state_dict.items()}
    try:
        adapters.load_adapter(inner, tensors, adapter_name=adapter_name)
    except MiniLoraError:
        for matrix, _ in placeholders:
            matrix.to("meta")  # placeholders again, as before the call
        raise
    for name, param in inner.named_parameters():
        param.requires_grad_(trainable[name])
    return _IncompatibleKeys(missing_keys=[], unexpected_keys=[])


def _meta_adapter(model: nn.Module, adapter_name: str) -> list[tuple[nn.Module, torch.device]]:
    """(A or B, the base layer's device) for each of the adapter's matrices that is a meta-device placeholder."""
    found = []
    for _, layer in lora_layers(model):
        if adapter_name in layer.lora_A:
            for matrix in (layer.lora_A[adapter_name], layer.lora_B[adapter_name]):
                if matrix.weight.is_meta:
                    found.append((matrix, layer.base_layer.weight.device))
    return found


def inject_adapter_in_model(peft_config: LoraConfig, model: nn.Module, adapter_name: str = "default",
                            low_cpu_mem_usage: bool = False, state_dict: Optional[Mapping] = None) -> nn.Module:
    """LoRA layers injected into ``model`` in place, without a wrapper (PEFT's ``inject_adapter_in_model``:
    same seed, same adapter, new layers in train mode). With ``low_cpu_mem_usage``, as in PEFT, A and
    B are placeholders on the meta device (nothing drawn from the random generator, no memory) until
    ``set_peft_model_state_dict`` loads them; forward fails before that. With ``state_dict`` (a checkpoint's
    tensors, PEFT's keys), the layers wrapped are those its keys name, as in PEFT (which warns when the config's
    target_modules would pick others); the config you pass records its own targets either way, and the model
    keeps a copy that names the layers wrapped (what its files say)."""
    if not isinstance(peft_config, LoraConfig):
        raise MiniLoraError(f"inject_adapter_in_model needs minilora.compat.LoraConfig, got "
                            f"{type(peft_config).__module__}.{type(peft_config).__qualname__}.")
    check_tied_modules(model, peft_config)
    resolved = resolved_targets(model, peft_config)
    chosen = peft_config if state_dict is None else _config_for_state_dict(model, peft_config, state_dict)
    with drawing_nothing(low_cpu_mem_usage):
        inject(model, chosen, adapter_name)
    peft_config.target_modules = resolved  # as PEFT: the default / "all-linear" names, written into the config
    leave_new_layers_in_train_mode(model, adapter_name)
    if low_cpu_mem_usage:
        adapter_on_meta(model, adapter_name)
    if getattr(peft_config, "inference_mode", False):
        for param in model.parameters():
            param.requires_grad_(False)
    return model


def _config_for_state_dict(model: nn.Module, peft_config: LoraConfig, state_dict: Mapping) -> LoraConfig:
    """PEFT's ``inject_adapter_in_model(state_dict=...)``: the layers to wrap are those the checkpoint's keys
    name (``X.lora_A.weight`` -> ``X``), not those ``target_modules`` picks; PEFT warns (a RuntimeWarning) when
    the two differ. A copy of the config that targets exactly those layers (r, alpha and the per-layer
    patterns still come from the config)."""
    named = [name for name, _ in model.named_modules() if name]
    in_keys = {str(key).rsplit(".lora_", 1)[0].removeprefix("_orig_mod.") for key in state_dict}
    targeted = [name for name in named if name in in_keys]
    if not targeted:
        raise MiniLoraError(f"inject_adapter_in_model(state_dict=...): no key of the state_dict names a layer of this "
                            f"model (e.g. {sorted(map(str, state_dict))[:2]}); pass the keys get_peft_model_state_dict "
                            "gives for a model like this one.")
    try:
        from_config = set(find_targets(model, peft_config))
    except MiniLoraError:
        from_config = set()
    extra_config, extra_state_dict = from_config - set(targeted), set(targeted) - from_config
    if extra_config or extra_state_dict:  # PEFT's words
        message = ("While injecting the PEFT adapters, an inconsistency was discovered between the PEFT config and the "
                   "provided state_dict. This is not necessarily an issue and can be ignored if this was the intent. ")
        if extra_config:
            message += f"The PEFT config contained these additional target modules: {sorted(extra_config)}. "
        if extra_state_dict:
            message += f"The state_dict contained these additional target modules: {sorted(extra_state_dict)}. "
        warnings.warn(message, RuntimeWarning, stacklevel=3)
    chosen = copy.copy(peft_config)
    chosen.target_modules, chosen.exclude_modules = targeted, None  # full names: each matches only itself
    chosen.layers_to_transform, chosen.layers_pattern = None, None
    return chosen


def original_key(key: str) -> Optional[str]:
    """Your model's key before LoRA (``lin0.base_layer.weight`` -> ``lin0.weight``, ``lin1.original_module.bias``
    -> ``lin1.bias``), or None for a key of the adapters (A, B, merged flags, modules_to_save copies)."""
    dotted = f".{key}"
    if is_lora_parameter(key) or ".lora_merged." in dotted or ".modules_to_save." in dotted:
        return None
    return dotted.replace(".base_layer.", ".").replace(".original_module.", ".")[1:]


def get_base_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Your model's state dict under its own keys, without the adapters (PEFT's ``get_base_model_state_dict``)."""
    state = model_inside(model).state_dict()
    return {original_key(key): value for key, value in state.items() if original_key(key) is not None}


def set_base_model_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor],
                              strict: bool = True) -> _IncompatibleKeys:
    """Load a state dict of your model's own keys into the model inside the wrapper (PEFT's
    ``set_base_model_state_dict``); the adapters are left as they are."""
    inner = model_inside(model)
    keys = {original_key(key): key for key in inner.state_dict() if original_key(key) is not None}
    unexpected = [key for key in state_dict if key not in keys]
    missing = [key for key in keys if key not in state_dict]
    if strict and (missing or unexpected):
        raise MiniLoraError(f"set_base_model_state_dict: missing keys {missing[:5]}, unexpected keys "
                            f"{unexpected[:5]}. Pass strict=False to load the keys that fit.")
    inner.load_state_dict({keys[key]: value for key, value in state_dict.items() if key in keys}, strict=False)
    return _IncompatibleKeys(missing_keys=missing, unexpected_keys=unexpected)
