"""The checks that keep a wrong adapter from being saved or loaded (nothing here changes a model).

Before saving (``saved_config``): the model's layers still agree with the config ``inject`` left on it
(targets, r, scaling), and its tensors are whole (not FSDP shards), so that the file loads back.

Before loading, every problem is found before the model is touched, as torchtune's strict loading does:
    check_file_keys       keys PEFT would not load (no ``base_model.model.``, another adapter's name)
    check_rank_agrees     a file whose config says one r and whose tensors have another
    expected_shapes       every tensor this model needs: A (r, in), B (out, r), biases, modules_to_save
    check_tensors         missing or unexpected keys, shapes, dtypes, NaN / inf (after the cast to
                          the dtype the model will hold them in: ``held_dtype``)
    saved_embedding_weights   the embedding weights PEFT saves with some adapters (saved_embeddings.py)
    other_layers_biases   the biases of other adapters' LoRA layers that PEFT saves with bias != "none"
    check_config_selects_the_layers   a config that would not describe the model's existing layers
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .adapter_files import PAIRS_HINT, PEFT_PREFIX
from .bounded_regex import time_bound
from .config import LoraConfig, MiniLoraError
from .inject import DEFAULT_ADAPTER, adapter_config, lora_layers
from .layer import HALF_DTYPES, LoraLinear, in_out_features
from .saved_embeddings import base_tensor, loadable_keys
from .saved_modules import (bias_all_keys, expected_saved_shapes, find_modules_to_save, is_saved_module_key,
                            original_key, saved_modules)
from .targets import find_targets, is_target, layer_rank_and_alpha, resolve_target_modules


# --------------------------------------------------------------------------------------------
# Before saving
# --------------------------------------------------------------------------------------------
def check_not_sharded(tensors: Mapping[str, torch.Tensor]) -> None:
    """Refuse the shards of a sharded model (FSDP2's ``fully_shard`` makes every parameter a DTensor
    that holds one rank's piece): an adapter file holds whole tensors."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch without torch.distributed
        return
    sharded = [key for key, value in tensors.items() if isinstance(value, DTensor)]
    if sharded:
        raise MiniLoraError(
            f"The model is sharded (e.g. FSDP2's fully_shard): {few(sharded)} are DTensor shards, not whole "
            "tensors. Gather a full state dict on every rank and save it from one:\n"
            "  from torch.distributed.checkpoint.state_dict import get_model_state_dict, StateDictOptions\n"
            "  state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))\n"
            "  if rank == 0: minilora.save_adapter(model, directory, state_dict=state)"
        )


def saved_config(model: nn.Module, adapter_name: str = DEFAULT_ADAPTER) -> LoraConfig:
    """The config ``inject`` left on the model for ``adapter_name``, after checking that every layer
    holding that adapter still agrees with it."""
    layers = list(lora_layers(model)) if isinstance(model, nn.Module) else []
    config = adapter_config(model, adapter_name) if layers else None
    if not layers or config is None:
        raise MiniLoraError(
            f"save_adapter needs a model with minilora layers and the config of adapter {adapter_name!r}, as "
            "minilora.inject(model, config) or minilora.load_adapter(model, directory) leave it. This model has none "
            f"({type(model).__name__}, {len(layers)} LoRA layers)."
        )
    try:
        config.validate()  # its fields may have been changed since inject
        selected = _selected_layers(model, config, [name for name, _ in layers])
    except MiniLoraError as error:
        raise MiniLoraError(f"The model's config was changed after inject and is no longer valid: {error}") from None
    holding = [name for name, layer in layers if adapter_name in layer.lora_A]  # (other adapters may have others)
    if selected != holding:
        raise MiniLoraError(
            f"The model's config.target_modules ({config.target_modules!r}) now selects {few(selected)}, but the "
            f"model's LoRA layers are {few(holding)}: the saved adapter could not be loaded "
            "back. target_modules was changed after inject; set it back, or inject again with the new targets."
        )
    for name, layer in layers:
        if adapter_name not in layer.lora_A:
            continue
        r, alpha = layer_rank_and_alpha(name, config)  # rank_pattern / alpha_pattern, else r / lora_alpha
        scaling = alpha / (math.sqrt(r) if config.use_rslora else r)
        layer_r, layer_scaling = layer.r[adapter_name], layer.scaling[adapter_name]
        if layer_r != r or abs(layer_scaling - scaling) > 1e-12 * abs(scaling):
            raise MiniLoraError(
                f"Layer {name!r} has r={layer_r}, scaling={layer_scaling:g} but the model's config says "
                f"r={r}, scaling={scaling:g} for it. PEFT's format holds r and lora_alpha (and rank_pattern / "
                "alpha_pattern) in the config; rebuild the adapter with one config."
            )
    return config


def _selected_layers(model: nn.Module, config: LoraConfig, layer_names: list[str]) -> list[str]:
    """The modules the config's targets select in a model that is already injected: the LoRA layers
    stand where their base layers stood, and modules inside a LoRA layer do not count."""
    inside = tuple(f"{name}." for name in layer_names)
    targets = resolve_target_modules(model, config)
    with time_bound():
        return [name for name, _ in model.named_modules()
                if name and not name.startswith(inside) and is_target(name, targets, config)]


# --------------------------------------------------------------------------------------------
# Before loading
# --------------------------------------------------------------------------------------------
def check_file_keys(tensors: Mapping[str, torch.Tensor], adapter_name: str, origin: str, from_file: bool) -> None:
    """Keys that PEFT would not load into adapter ``adapter_name``, refused rather than loaded differently:

    - in a file, a key without ``base_model.model.`` (PEFT's files have it on every key; PEFT reports
      the others as unexpected and leaves the adapter's layers as they were initialised);
    - a key that names another adapter, ``<layer>.lora_A.other.weight``: PEFT's loader inserts the name
      only into keys without one, so it ignores the key, or writes it into the adapter ``other``.
    """
    if from_file:
        bare = [key for key in tensors if not key.startswith(PEFT_PREFIX)]
        if bare:
            raise MiniLoraError(f"{origin}: keys {few(sorted(bare))} do not start with {PEFT_PREFIX!r}, as every key "
                                "in PEFT's adapter files does (PEFT would not load them). The file was not written "
                                "by PEFT's save_pretrained or minilora.save_adapter: save the adapter again.")
    for key in tensors:
        named = re.search(r"\.lora_[AB]\.([^.]+)\.(weight|bias)$", key)
        if named and named.group(1) != adapter_name:
            raise MiniLoraError(f"{origin}: key {key!r} names the adapter {named.group(1)!r}, but it is being loaded "
                                f"as {adapter_name!r}; PEFT would not load it into {adapter_name!r}. Adapter files "
                                "hold no adapter name (<layer>.lora_A.weight): save the adapter again with "
                                "save_adapter / save_pretrained, or load it with adapter_name="
                                f"{named.group(1)!r}.")


def check_dense(tensors: Mapping[str, torch.Tensor], origin: str, unread: bool = False) -> None:
    """Adapters hold plain (strided) tensors with data: a sparse or nested tensor (a ``.bin`` can hold one),
    or one on the meta device (no values), would fail in the checks or the copy with a bare torch error.
    ``unread``: the tensors are a safetensors header's entries, on the meta device until their values are read."""
    odd = [key for key, value in tensors.items()
           if value.layout != torch.strided or value.is_nested or (value.is_meta and not unread)]
    if odd:
        value = tensors[odd[0]]
        kind = "on the meta device (it has no values)" if value.is_meta else f"a {value.layout} tensor"
        raise MiniLoraError(f"{origin}: {odd[0]} is {kind}; adapters hold dense tensors with values ({len(odd)} such "
                            "tensors). The file was not written by PEFT or minilora: save the adapter again.")


def expected_shapes(model: nn.Module, config: LoraConfig | None,
                    adapter_name: str = DEFAULT_ADAPTER) -> dict[str, tuple[int, ...]]:
    """Every tensor the adapter must hold for this model, by the model's key after loading, with its shape.

    A model whose minilora layers hold ``adapter_name`` expects A (r, in) and B (out, r) of exactly
    those layers; otherwise the targets of ``config`` are expected, as ``inject`` / ``add_adapter``
    will build them.
    """
    layers = {name: layer for name, layer in lora_layers(model) if adapter_name in layer.lora_A}
    adapter = adapter_name
    if layers:
        sizes = {name: (layer.in_features, layer.out_features, layer.r[adapter]) for name, layer in layers.items()}
    else:
        sizes = {name: (*_in_out(model.get_submodule(name)), layer_rank_and_alpha(name, config)[0])
                 for name in find_targets(model, config)}
    shapes = expected_saved_shapes(model, saved_module_names(model, config, list(sizes), adapter), adapter)
    lora_bias = layers[next(iter(layers))].lora_bias[adapter] if layers else getattr(config, "lora_bias", False)
    for name, (fan_in, fan_out, r) in sizes.items():
        shapes[f"{name}.lora_A.{adapter}.weight"] = (r, fan_in)
        shapes[f"{name}.lora_B.{adapter}.weight"] = (fan_out, r)
        if lora_bias:
            shapes[f"{name}.lora_B.{adapter}.bias"] = (fan_out,)
    bias = config.bias if config is not None else "none"
    if bias != "none":
        saved_names = saved_module_names(model, config, list(sizes), adapter)
        state = model.state_dict()
        for key in bias_all_keys(model, saved_names) if bias == "all" else []:  # PEFT's extra keys (saved_modules.py)
            shapes[key] = tuple(state[key if key in state else original_key(key)].shape)  # (wrapped or not yet)
        for key, value in model.state_dict().items():
            module_name, _, last = key.rpartition(".")
            if last != "bias" or is_saved_module_key(key) or module_name in saved_names or module_name.startswith(
                    tuple(f"{name}." for name in saved_names)):  # (a bias inside a saved module is its copy's)
                continue
            if module_name in sizes and not layers:
                key = f"{module_name}.base_layer.bias"  # where the bias will be once the layer is wrapped
            if bias == "all" or key.removesuffix(".base_layer.bias") in sizes:
                shapes[key] = tuple(value.shape)
    return shapes


def _in_out(module: nn.Module) -> tuple[int, int]:
    """(in, out) of a plain linear layer or of the one a LoraLinear wraps."""
    return (module.in_features, module.out_features) if isinstance(module, LoraLinear) else in_out_features(module)


def saved_module_names(model: nn.Module, config: LoraConfig | None, lora_targets: list[str],
                       adapter_name: str = DEFAULT_ADAPTER) -> list[str]:
    """The modules_to_save of adapter ``adapter_name``: the modules holding its copies if the model has
    the adapter already, else those its config selects (wrapped by another adapter or not yet)."""
    holding = [name for name, wrapper in saved_modules(model) if adapter_name in wrapper.modules_to_save]
    if holding or any(adapter_name in layer.lora_A for _, layer in lora_layers(model)):
        return holding
    return find_modules_to_save(model, getattr(config, "modules_to_save", None), lora_targets)


def check_config_selects_the_layers(model: nn.Module, config: LoraConfig, adapter_name: str) -> None:
    """Loading into existing layers: the file's config becomes the model's, so it must select exactly
    the layers that hold the adapter (else the model would carry a config that does not describe it, and
    a file saved from it would not load back)."""
    holding = [name for name, layer in lora_layers(model) if adapter_name in layer.lora_A]
    selected = find_targets(model, config)  # (a LoRA layer is a target as the layer it wraps)
    if selected != holding:
        raise MiniLoraError(f"its targets (target_modules={config.target_modules!r}, layers_to_transform="
                            f"{config.layers_to_transform!r}, ...) select {few(selected)} in this model, but the "
                            f"layers that hold adapter {adapter_name!r} are {few(holding)}. Load the adapter into a "
                            "fresh base model, or call minilora.unload(model) first.")


def check_tensors(tensors: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]], source: str,
                  config: LoraConfig | None, model: nn.Module, autocast_adapter_dtype: bool = True) -> None:
    """Missing keys, unexpected keys, shapes, dtypes, finiteness: every problem, before any change."""
    missing = sorted(set(shapes) - set(tensors))
    unexpected = sorted(set(tensors) - set(shapes))
    if missing or unexpected:
        has_layers = any(True for _ in lora_layers(model))
        hint = ("The adapter was saved for other layers than this model's minilora layers: load it into a fresh "
                "base model, or call minilora.unload(model) first." if has_layers else
                "The adapter was saved from another model or with other target_modules.")
        if len(unexpected) > len(shapes):
            hint = "This looks like a whole model's state dict, not an adapter. " + PAIRS_HINT
        raise MiniLoraError(f"{source} does not fit this {type(model).__name__}: missing keys {few(missing)}, "
                            f"unexpected keys {few(unexpected)}. {hint}")
    state = model.state_dict(keep_vars=True)  # (once: a large model's takes milliseconds, and adapters hold hundreds)
    for key, shape in shapes.items():
        tensor = tensors[key]
        if tuple(tensor.shape) != shape:
            hint = (f"The adapter has r={config.r} (adapter_config.json) but this model's layers have another r: "
                    "load it into a fresh base model, or call minilora.unload(model) first."
                    if config is not None and ".lora_" in key and any(True for _ in lora_layers(model)) else
                    "The adapter was saved from another model (or another r than its config says).")
            raise MiniLoraError(f"{source}: {key} has shape {tuple(tensor.shape)} but this model needs {shape}. "
                                f"{hint}")
        if tensor.dtype not in LOADABLE_DTYPES:
            raise MiniLoraError(f"{source}: {key} holds {tensor.dtype}; adapters hold float16, bfloat16, float32 "
                                "or float64 numbers. The file is corrupt or was made by another tool: save the "
                                "adapter again.")
        # The values the model will hold: float64 values beyond float32's range become inf in the cast.
        held = held_dtype(state, key, autocast_adapter_dtype)
        if not all_finite(tensor.to(held)):
            cast = f" once cast to the model's {held}" if tensor.dtype != held else ""
            raise MiniLoraError(f"{source}: {key} holds NaN or inf values{cast}: the file is corrupt or the "
                                "training diverged. Nothing was loaded.")


LOADABLE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or inf. A tensor on the meta device is a safetensors header's entry whose values are not read
    yet (adapter_files.py): ``load_adapter`` checks them again once read."""
    return tensor.is_meta or bool(torch.isfinite(tensor).all())


def nested_original_biases(model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Check the originals' biases inside saved modules that PEFT's bias="all" files hold
    (``classifier.original_module.dense.bias``) against the model's own.

    Raises:
        MiniLoraError: for another shape, a non-float dtype, or NaN / inf values.
    """
    state = model.state_dict()
    for key, value in tensors.items():
        own = state[key if key in state else original_key(key)]
        if value.shape != own.shape or value.dtype not in LOADABLE_DTYPES or not all_finite(value):
            raise MiniLoraError(f"{source}: {key} has shape {tuple(value.shape)} and dtype {value.dtype}, or NaN / "
                                f"inf values; this model's is {tuple(own.shape)}. The file does not belong to it.")


def saved_embedding_weights(model: nn.Module, renamed: dict[str, torch.Tensor], lora_targets: list[str],
                            source: str, adapter_keys: Mapping[str, object], saved_names: Sequence[str] = (),
                            ) -> list[tuple[str, str, torch.Tensor]]:
    """The embedding layers' own weights that PEFT's files may hold (saved_embeddings.py): an adapter
    on lm_head holds ``lm_head.base_layer.weight``, one saved after ``resize_token_embeddings`` (or with
    ``save_embedding_layers=True``) ``transformer.wte.weight`` and ``lm_head.weight``, or for such a layer
    in ``modules_to_save`` (``saved_names``) ``lm_head.original_module.weight``; PEFT loads them into the
    base model (a saved module's original). Those keys are taken out of ``renamed`` and returned as (layer name, "weight"
    or "bias", tensor), checked like the adapter's own. Keys in ``adapter_keys`` (the adapter's own, e.g.
    the biases of bias="all") are left in ``renamed``.

    Raises:
        MiniLoraError: for such a tensor of another shape (e.g. another vocabulary size), a non-float
            dtype, or NaN / inf values.
    """
    found = []
    for key, (name, attribute) in loadable_keys(model, lora_targets, saved_names).items():
        if key not in renamed or key in adapter_keys:
            continue
        value, own = renamed.pop(key), base_tensor(model, name, attribute)
        if value.shape != own.shape:
            resized = (" If the adapter was trained after resize_token_embeddings, resize this model the same way "
                       f"first: model.resize_token_embeddings({value.shape[0]}) (PEFT fails here too)."
                       if value.dim() == 2 and value.shape[1:] == own.shape[1:] else "")
            raise MiniLoraError(f"{source}: {key} (the base {attribute} PEFT saves with the embedding layers) has "
                                f"shape {tuple(value.shape)}; this model's is {tuple(own.shape)}. The file does not "
                                f"belong to this model.{resized}")
        if value.dtype not in LOADABLE_DTYPES or not all_finite(value.to(own.dtype)):
            raise MiniLoraError(f"{source}: {key} (the base {attribute} PEFT saves with the embedding layers) "
                                f"holds {value.dtype}, or NaN / inf values. The file is corrupt: save it again.")
        found.append((name, attribute, value))
    return found


def other_layers_biases(model: nn.Module, renamed: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]],
                        lora_targets: Sequence[str], bias: str) -> None:
    """The biases of *other* adapters' layers that PEFT's file of a bias="lora_only" or "all" adapter
    holds: PEFT saves the bias of every LoRA layer (``<layer>.base_layer.bias``), and with "all" of every
    saved module's original (``<module>.original_module.bias``), whichever adapter wrapped it. Where
    another adapter has wrapped the layer in this model too, PEFT loads that key, and so does minilora
    (the key joins ``shapes``). Where the layer is a plain one, PEFT's loader ignores the key and keeps the
    model's bias, which loses a bias trained beside the other adapter (README, "Where minilora differs from
    PEFT on purpose"); minilora loads it into the plain layer's ``<layer>.bias``: the saved model. (An
    untrained bias equals the model's own: then both give the same model.) A bias="none" file holds no such
    keys: there they stay unexpected (check_tensors refuses them).
    """
    if bias == "none":
        return
    state = model.state_dict()
    ours = {f"{name}.base_layer.bias" for name in lora_targets}
    wrapped = re.compile(r"\.(base_layer|original_module)\.")
    for key in [key for key in renamed if key.endswith("bias") and wrapped.search(key) and key not in shapes
                and key not in ours]:
        plain = wrapped.sub(".", key, count=1)
        if key in state:  # a layer another adapter wrapped in this model too: PEFT loads its bias
            shapes[key] = tuple(state[key].shape)
        elif plain in state and plain not in renamed:
            renamed[plain] = renamed.pop(key)
            shapes[plain] = tuple(state[plain].shape)  # (checked like the adapter's own tensors)


def held_dtype(state: Mapping[str, torch.Tensor], key: str, autocast_adapter_dtype: bool = True) -> torch.dtype:
    """The dtype the model will hold the tensor ``key`` (the model's key after loading) in, read from its
    ``state`` (``model.state_dict(keep_vars=True)``, which the caller takes once for all keys).

    An existing parameter keeps its dtype; A and B of a layer ``inject`` is about to build take the
    base weight's dtype, float32 for a float16 / bfloat16 base with ``autocast_adapter_dtype``
    (LoraLinear, as PEFT does).
    """
    if key in state:
        return state[key].dtype
    if is_saved_module_key(key):  # a copy not made yet: the module's own dtype (wrapped by another adapter or not)
        plain = original_key(key)
        return state[plain if plain in state else original_key(key, wrapped=True)].dtype
    module, _, _ = key.partition(".lora_") if ".lora_" in key else key.rpartition(".base_layer.bias")
    name = f"{module}.weight" if ".lora_" in key else f"{module}.bias"
    dtype = state[name if name in state else f"{module}.base_layer.weight"].dtype  # (a LoRA layer already)
    return torch.float32 if autocast_adapter_dtype and dtype in HALF_DTYPES and ".lora_" in key else dtype


def check_rank_agrees(tensors: Mapping[str, torch.Tensor], config: LoraConfig, source: str) -> None:
    """A file whose config says one r and whose tensors have another contradicts itself: refuse it,
    whatever the model (a model with layers of the tensors' r would accept the shapes and take the
    config's scaling)."""
    for key, tensor in tensors.items():
        side = 0 if ".lora_A." in key else 1 if ".lora_B." in key else None  # (r, in) or (out, r)
        r = layer_rank_and_alpha(key.partition(".lora_")[0], config)[0]  # rank_pattern, else config.r
        if side is not None and tensor.dim() == 2 and tensor.shape[side] != r:
            raise MiniLoraError(f"{source}: adapter_config.json says r={r} but {key} has shape "
                                f"{tuple(tensor.shape)}, i.e. r={tensor.shape[side]}: the config and the weights "
                                "disagree. Save the adapter again.")


def few(names: list[str], limit: int = 4) -> str:
    """A list of names, cut short for an error message."""
    shown = ", ".join(names[:limit]) or "none"
    return f"[{shown}{f', ... ({len(names)} in all)' if len(names) > limit else ''}]"
