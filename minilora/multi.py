"""Several adapters in one model: add them, choose which take part, delete, merge, and ask their state.

Each LoraLinear keeps its adapters by name (layer.py). Across a model, with PEFT's semantics:

    minilora.inject(model, config)                      # adapter "default": active, trains
    minilora.add_adapter(model, "other", config2)       # same seed -> same A, B as PEFT's add_adapter;
                                                        # inactive and frozen until chosen
    minilora.set_adapter(model, "other")                # forward uses it; its A and B train, default's do not
    minilora.set_adapter(model, ["default", "other"])   # h = W0 x + s1 B1 A1 x + s2 B2 A2 x
    minilora.delete_adapter(model, "default")

Files: ``save_adapters`` writes PEFT's layout (the "default" adapter at the root of the directory,
every other one in a sub-directory named after it); ``minilora.load_adapter(model, directory,
adapter_name=...)`` reads one adapter into a model that has others (adapters.py).

The model-wide state is the layers' state: the active adapters are those of the LoRA layers (all
layers agree unless changed by hand), and ``model_status`` says "irregular" where they do not.
"""

from __future__ import annotations

import collections
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from torch import nn

from .config import LoraConfig, MiniLoraError
from .inject import (CONFIGS_ATTRIBUTE, DEFAULT_ADAPTER, _replace_module, adapter_configs, build_adapter,
                     check_adapter_name, require_lora_layers, set_adapter_config)
from .layer import LoraLinear, check_autocast_adapter_dtype
from .saved_modules import (check_can_delete_copies, delete_saved_copies, find_modules_to_save, saved_modules,
                            set_saved_modules_adapter, wrap_modules_to_save)
from .targets import find_targets

if TYPE_CHECKING:
    from .adapters import PreparedSave

BASE = "__base__"  # in a mixed batch, the rows that get no adapter (PEFT's name)


# --------------------------------------------------------------------------------------------
# Which adapters there are, and which take part
# --------------------------------------------------------------------------------------------
def adapter_names(model: nn.Module) -> list[str]:
    """The model's adapters, in the order they were added."""
    return list(adapter_configs(model))


def active_adapters(model: nn.Module) -> list[str]:
    """The adapters forward adds, in order (those of the first LoRA layer: all layers agree)."""
    return list(require_lora_layers(model, "active_adapters")[0][1].active_adapters)


def set_adapter(model: nn.Module, adapter_names: str | list[str], inference_mode: bool = False) -> None:
    """Make ``adapter_names`` (one name or a list) the active adapters of every LoRA layer.

    As PEFT: their A and B require grad (unless ``inference_mode``), every other adapter's do not;
    a merged layer is unmerged first, with PEFT's warning. Each module in modules_to_save runs the copy
    of the one named adapter that has one (or its original).

    Raises:
        MiniLoraError: before changing anything, if a name is not an adapter of the model, two named
            adapters have copies of the same module in modules_to_save, or the list is empty where the model
            has such a module (as PEFT).
    """
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    _check_known(model, names, "set_adapter")
    layers = require_lora_layers(model, "set_adapter")
    set_saved_modules_adapter(model, names, inference_mode)  # (first: it refuses two active copies of one module)
    for _, layer in layers:
        if layer.merged:
            warnings.warn("Adapter cannot be set when the model is merged. Unmerging the model first.", stacklevel=2)
            layer.unmerge()
        layer.set_adapter(names, inference_mode=inference_mode)


def enable_adapters(model: nn.Module, enabled: bool = True) -> None:
    """Switch every LoRA layer (and saved module) on or off, as PEFT's enable/disable_adapter_layers.

    Off: the base model's outputs, and no adapter requires grad (no LoRA layer, no modules_to_save
    copy, of any adapter). On again: the active adapters require grad (PEFT's ``set_adapter``).
    ``minilora.disabled(model)`` is the block form that only switches, leaving requires_grad alone.
    """
    for _, layer in require_lora_layers(model, "enable_adapters"):
        layer.enable_adapters(enabled)
    for _, wrapper in saved_modules(model):
        wrapper.disabled = not enabled
        if not enabled:  # every copy, the inactive adapters' too (PEFT's ModulesToSaveWrapper.enable_adapters)
            for trained in wrapper.modules_to_save.values():
                trained.requires_grad_(False)
        elif wrapper.trained is not None:
            wrapper.trained.requires_grad_(True)


# --------------------------------------------------------------------------------------------
# Adding and deleting
# --------------------------------------------------------------------------------------------
def check_can_add(model: nn.Module, adapter_name: str, config: LoraConfig) -> None:
    """Raise MiniLoraError, before anything changes, if ``config`` cannot be added as ``adapter_name``."""
    require_lora_layers(model, "add_adapter")
    if not isinstance(config, LoraConfig):
        raise MiniLoraError(f"add_adapter needs a minilora.LoraConfig, got {type(config).__name__}.")
    check_adapter_name(adapter_name)
    if adapter_name in adapter_configs(model):
        raise MiniLoraError(f"The model has an adapter named {adapter_name!r} already ({adapter_names(model)}). "
                            "Pick another name, or minilora.delete_adapter it first.")
    config.validate()
    if config.bias != "none" and any(other.bias != "none" for other in adapter_configs(model).values()):
        raise MiniLoraError("LoraModel supports only 1 adapter with bias. When using multiple adapters, set bias to "
                            f"'none' for all adapters. (PEFT's words; this adapter has bias={config.bias!r}.)")
    if config.bias != "none":  # (PEFT allows it when the other adapters train no bias; minilora does not yet)
        raise MiniLoraError(f"bias={config.bias!r}: minilora trains biases for the first adapter only. Add this "
                            "adapter with bias='none'.")


def add_adapter(model: nn.Module, adapter_name: str, config: LoraConfig,
                autocast_adapter_dtype: bool = True) -> nn.Module:
    """Add a new adapter to a model that has LoRA layers, as PEFT's ``add_adapter`` does.

    Its targets are ``config``'s: a target that is already a LoRA layer gets the new adapter next to
    the others, a plain one is wrapped. A and B are drawn in PEFT's order, so the same seed gives the
    same weights. The new adapter is not active and does not train until ``set_adapter`` chooses it;
    nothing else changes (the active adapters and what requires grad stay as they were).
    ``autocast_adapter_dtype`` as in ``minilora.inject``.

    Returns:
        the same ``model`` object.

    Raises:
        MiniLoraError: before anything changes, for a name in use, a bad config, or targets that do not fit.
    """
    check_can_add(model, adapter_name, config)
    check_autocast_adapter_dtype(autocast_adapter_dtype)
    names = find_targets(model, config)
    to_save = find_modules_to_save(model, config.modules_to_save, names)  # one more copy each (saved_modules.py)
    active = active_adapters(model)
    trainable = {id(param): param.requires_grad for param in model.parameters()}
    new_layers = build_adapter(model, config, adapter_name, names, autocast_adapter_dtype)
    for name, layer in new_layers.items():
        layer.set_adapter(active)  # the model's active adapters, which this layer does not hold: frozen
        _replace_module(model, name, layer)
    wrap_modules_to_save(model, to_save, adapter_name, active=False)  # frozen copies, used once set_adapter picks them
    for param in model.parameters():  # as PEFT: what trained before (bias="all") still does, and nothing else starts
        if id(param) in trainable:
            param.requires_grad_(trainable[id(param)])
    set_adapter_config(model, adapter_name, config)
    return model


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove an adapter from every layer, as PEFT's ``delete_adapter``.

    If it was active, the other active adapters stay so; if none is left, the first remaining name
    (sorted) becomes active, with PEFT's warning.

    Raises:
        MiniLoraError: before anything changes, if there is no such adapter or it is merged.
    """
    _check_known(model, [adapter_name], "delete_adapter")
    layers = require_lora_layers(model, "delete_adapter")
    merged = [name for name, layer in layers if adapter_name in layer.merged_adapters]
    if merged:
        raise MiniLoraError(f"Cannot delete adapter {adapter_name!r} while it is merged (e.g. in {merged[0]!r}): "
                            "W0 holds its dW. Call minilora.unmerge(model) first.")
    new_active = layers[0][1].active_after_delete(adapter_name)  # (PEFT: the first LoRA layer's choice)
    check_can_delete_copies(model, adapter_name, new_active)
    for _, layer in layers:
        layer.delete_adapter(adapter_name)
    delete_saved_copies(model, adapter_name, new_active)
    getattr(model, CONFIGS_ATTRIBUTE).pop(adapter_name)


def _check_known(model: nn.Module, names: list[str], action: str) -> None:
    known = adapter_names(model)
    unknown = [name for name in names if name not in known]
    if unknown:
        raise MiniLoraError(f"{action}: no adapter named {unknown[0]!r}; the model has {known}.")


# --------------------------------------------------------------------------------------------
# Files: PEFT's layout for several adapters
# --------------------------------------------------------------------------------------------
def adapter_directory(directory: str | os.PathLike, adapter_name: str) -> Path:
    """Where ``save_adapters`` puts one adapter, as PEFT's ``save_pretrained`` (``os.path.join``): the
    directory itself for "default", else ``directory/<name>`` (``a/b``: the folder ``b`` inside ``a``).

    Raises:
        MiniLoraError: if the name is an absolute path (``/tmp/x``): PEFT writes that adapter there, outside
            ``directory``; minilora does not. (Names cannot hold dots, inject.py, so ``..`` cannot climb out.)
    """
    if adapter_name == DEFAULT_ADAPTER:
        return Path(directory)
    if os.path.isabs(adapter_name) or Path(adapter_name).anchor:
        raise MiniLoraError(f"Adapter name {adapter_name!r} is a path that leads out of {str(directory)!r}: PEFT's "
                            "save_pretrained would write this adapter outside the folder it is given. Saving it is "
                            "refused; rename the adapter (a name that does not start with '/' or '\\'), then save.")
    return Path(directory) / adapter_name


def save_adapters(model: nn.Module, directory: str | os.PathLike, selected_adapters: list[str] | None = None,
                  **kwargs) -> None:
    """Save several adapters in PEFT's layout: "default" at the root of ``directory``, every other
    adapter in ``directory/<name>/`` (PEFT's ``save_pretrained``). ``kwargs`` go to ``save_adapter``.

    Each folder is saved as ``save_adapter`` saves one (whole, or not at all), one after the other: a save
    killed half-way leaves some folders with the new adapter and the others with the old one.

    Raises:
        MiniLoraError: before writing anything, for anything ``save_adapter`` refuses in any of the adapters
            (a model check, a file where a folder goes, a folder where a file goes), a name that is not an
            adapter of the model, a name that leads out of ``directory``, or two names that share a folder.
    """
    names = adapter_names(model) if selected_adapters is None else list(selected_adapters)
    _check_known(model, names, "save_adapters")
    write_all(prepare_saves(model, directory, names, **kwargs), names)


def write_all(saves: list, names: list[str]) -> None:
    """Write prepared saves in turn. A write that fails after others succeeded (a full disk cannot be
    checked beforehand; making a later adapter's bytes can run out of memory) says which adapters already
    hold their new files: a MiniLoraError chained from the original error, or, for an interrupt
    (KeyboardInterrupt, SystemExit), the interrupt itself with that note added."""
    for done, save in enumerate(saves):
        try:
            save.write()
        except BaseException as error:
            if not done:
                raise
            saved = (f"Saving adapter {names[done]!r} failed after {names[:done]} were saved (their folders hold the "
                     f"new files; {names[done]!r} and the rest are as before)")
            if not isinstance(error, Exception):  # an interrupt stays one
                error.add_note(f"minilora: {saved}.")
                raise
            what = str(error) if isinstance(error, MiniLoraError) else f"{type(error).__name__}: {error}".rstrip(": ")
            what += "" if what.endswith(".") else "."  # (MemoryError() says nothing; an OSError ends without a period)
            raise MiniLoraError(f"{saved}: {what} Then save the rest again: selected_adapters={names[done:]!r}.") \
                from (None if isinstance(error, MiniLoraError) else error)


def prepare_saves(model: nn.Module, directory: str | os.PathLike, names: list[str], **kwargs) -> list[PreparedSave]:
    """``adapters.prepare_save`` of each named adapter in its folder (``adapter_directories``): every check
    of every adapter, before anything is written (each one's bytes are made when it is written).
    ``kwargs`` go to ``prepare_save``."""
    from .adapters import prepare_save

    paths = adapter_directories(directory, names)
    # (each folder is probed for writing there: one that cannot be written is found now, not after the first
    # adapters are saved)
    return [prepare_save(model, path, adapter_name=name, **kwargs) for name, path in zip(names, paths)]


def adapter_directories(directory: str | os.PathLike, names: list[str]) -> list[Path]:
    """``adapter_directory`` of each name; two names that land in one folder (``x`` and ``x/``, which PEFT
    would save one over the other) are refused."""
    paths = [adapter_directory(directory, name) for name in names]
    seen: dict[Path, str] = {}
    for name, path in zip(names, paths):
        if path in seen:
            raise MiniLoraError(f"Adapters {seen[path]!r} and {name!r} would both be saved in {path} (the second over "
                                "the first). Rename one of them, or save them with two calls into two folders.")
        seen[path] = name
    return paths


# --------------------------------------------------------------------------------------------
# State: PEFT's get_layer_status / get_model_status
# --------------------------------------------------------------------------------------------
@dataclass
class LayerStatus:
    """One LoRA layer (or saved module): PEFT's ``TunerLayerStatus`` fields."""

    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, bool | Literal["irregular"]]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None = None


@dataclass
class ModelStatus:
    """The whole model: PEFT's ``TunerModelStatus`` fields; "irregular" where the layers disagree."""

    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: bool | Literal["irregular"]
    active_adapters: list[str] | Literal["irregular"]
    merged_adapters: list[str] | Literal["irregular"]
    requires_grad: dict[str, bool | Literal["irregular"]]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None | Literal["irregular"] = None


def _agree(values: list) -> bool | Literal["irregular"]:
    """True if all are True, False if all are False, else "irregular" (PEFT's check_irrgular)."""
    if all(value is True for value in values):
        return True
    if all(value is False for value in values):
        return False
    return "irregular"


def layer_status(model: nn.Module, module_type: str = "LoraLinear") -> list[LayerStatus]:
    """The state of each LoRA layer and saved module, in module order (PEFT's ``get_layer_status``). A saved
    module without parameters (a rotary embedding) has no requires_grad entry, as in PEFT."""
    rows = []
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            tables = {adapter: [*module.lora_A[adapter].parameters(), *module.lora_B[adapter].parameters()]
                      for adapter in module.lora_A}
            rows.append(LayerStatus(name, module_type, not module.disabled, list(module.active_adapters),
                                    list(module.merged_adapters),
                                    {k: _agree([p.requires_grad for p in v]) for k, v in tables.items()},
                                    sorted(tables), {k: sorted({p.device.type for p in v}) for k, v in tables.items()}))
        elif type(module).__name__ == "ModulesToSave":
            params = {adapter: list(copy.parameters()) for adapter, copy in module.modules_to_save.items()}
            rows.append(LayerStatus(name, "ModulesToSaveWrapper", not module.disabled, list(module.active_adapters),
                                    [], {k: _agree([p.requires_grad for p in v]) for k, v in params.items() if v},
                                    sorted(params), {k: sorted({p.device.type for p in v}) for k, v in params.items()}))
    if not rows:
        raise MiniLoraError("layer_status: this model has no minilora layers. Call minilora.inject(model, config) "
                            "first.")
    return rows


def model_status(model: nn.Module, layers: list[LayerStatus] | None = None,
                 adapter_model_type: str = "minilora") -> ModelStatus:
    """The state of the model's adapters, summed over its layers (PEFT's ``get_model_status``)."""
    from .params import count_parameters

    rows = layer_status(model) if layers is None else layers
    enabled = {row.enabled for row in rows}
    actives = {tuple(row.active_adapters) for row in rows}
    merged_all = sorted({name for row in rows for name in row.merged_adapters})
    irregular_merge = any(set(row.available_adapters) - set(row.merged_adapters) & set(merged_all) for row in rows)
    grads, devices = collections.defaultdict(list), collections.defaultdict(set)
    for row in rows:
        for name, value in row.requires_grad.items():
            grads[name].append(value)
        for name, value in row.devices.items():
            devices[name].update(value)
    trainable, total = count_parameters(model)
    return ModelStatus(
        base_model_type=type(model).__name__ if hasattr(model, "config") else "other",
        adapter_model_type=adapter_model_type,
        peft_types={name: "LORA" for name in adapter_names(model)},
        trainable_params=trainable,
        total_params=total,
        num_adapter_layers=len(rows),
        enabled=enabled.pop() if len(enabled) == 1 else "irregular",
        active_adapters=list(actives.pop()) if len(actives) == 1 else "irregular",
        merged_adapters="irregular" if irregular_merge else merged_all,
        requires_grad={name: _agree(values) for name, values in grads.items()},
        available_adapters=sorted({name for row in rows for name in row.available_adapters}),
        devices={name: sorted(value) for name, value in devices.items()},
    )
