"""PEFT's methods for several adapters, set on the model by ``minilora.compat`` (PEFT's names and
arguments; the work is done by multi.py, adapters.py and inject.py).

    model = get_peft_model(base, config)              # adapter "default"
    model.add_adapter("other", config2)               # PeftModel.add_adapter
    model.set_adapter("other")                        # or a list: ["default", "other"]
    model.active_adapter, model.active_adapters, model.peft_config
    model.save_pretrained("out")                      # out/ (default), out/other/, and out/README.md
    model.load_adapter("out/other", adapter_name="other")
    model.merge_adapter(); model.unmerge_adapter()    # what TRL calls to sync weights into vLLM
    model.disable_adapter_layers(); model.enable_adapter_layers()
    model.get_layer_status(); model.get_model_status()

Where PEFT warns, these warn with PEFT's words; where PEFT raises ValueError for a bad argument,
they raise MiniLoraError (a ValueError too) before anything changes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional

from torch import nn

from . import adapters, multi
from .config import MiniLoraError
from .inject import CONFIGS_ATTRIBUTE, adapter_configs, lora_layers, require_lora_layers
from .weighted import add_weighted_adapter


def sync_attributes(model: nn.Module) -> None:
    """PEFT's attributes ``peft_config`` (the live dict of configs), ``active_adapter`` (a name, or a
    list when several are active) and ``active_adapters`` (a list), as plain attributes of the model:
    every method here refreshes them after changing the state."""
    model.__dict__["peft_config"] = getattr(model, CONFIGS_ATTRIBUTE, {})
    active = multi.active_adapters(model) if any(True for _ in lora_layers(model)) else []
    model.__dict__["active_adapters"] = active
    model.__dict__["active_adapter"] = active[0] if len(active) == 1 else active


def _add_adapter(model: nn.Module, adapter_name: str, peft_config: Any, low_cpu_mem_usage: bool = False,
                 autocast_adapter_dtype: bool = True) -> None:
    """PeftModel.add_adapter: build a new adapter, inactive and frozen (same seed, same weights as PEFT)."""
    if adapter_name in adapter_configs(model):
        raise MiniLoraError(f"Adapter with name '{adapter_name}' already exists.")
    if autocast_adapter_dtype is not True:
        raise MiniLoraError("minilora always keeps float16 / bfloat16 adapters in float32 (PEFT's "
                            "autocast_adapter_dtype=True).")
    multi.add_adapter(model, adapter_name, peft_config)
    for _, layer in lora_layers(model):  # PEFT's new modules start in train mode (compat.leave_new_layers_in_train_mode)
        if adapter_name in layer.lora_A:
            for table in (layer.lora_A, layer.lora_B, layer.lora_dropout):
                table[adapter_name].train(True)
            if list(layer.lora_A) == [adapter_name]:  # a layer built for this adapter
                layer.training = True
    sync_attributes(model)


def _set_adapter(model: nn.Module, adapter_name: str | list[str], inference_mode: bool = False) -> None:
    """PeftModel.set_adapter (one name), or LoraModel.set_adapter (a list): the active adapters."""
    multi.set_adapter(model, adapter_name, inference_mode=inference_mode)
    sync_attributes(model)


def _delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """PeftModel.delete_adapter."""
    multi.delete_adapter(model, adapter_name)
    sync_attributes(model)


def _load_adapter(model: nn.Module, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False,
                  torch_device: Optional[str] = None, autocast_adapter_dtype: bool = True, **kwargs: Any) -> Any:
    """PeftModel.load_adapter: read a saved adapter in as ``adapter_name`` (new: inactive; frozen unless
    ``is_trainable``). As PEFT, ``is_trainable=False`` puts the model in eval mode."""
    from .compat import resolve_adapter_source

    if autocast_adapter_dtype is not True:
        raise MiniLoraError("minilora always keeps float16 / bfloat16 adapters in float32 (PEFT's "
                            "autocast_adapter_dtype=True).")
    directory = resolve_adapter_source(model_id, kwargs, "load_adapter")
    adapters.load_adapter(model, directory, is_trainable=is_trainable, adapter_name=adapter_name)
    if torch_device is not None:
        model.to(torch_device)
    if not is_trainable:
        model.eval()
    sync_attributes(model)


def _save_pretrained(model: nn.Module, save_directory: str | os.PathLike, safe_serialization: bool = True,
                     selected_adapters: Optional[list[str]] = None, save_embedding_layers: Any = "auto",
                     is_main_process: bool = True, state_dict: Any = None, **kwargs: Any) -> None:
    """PeftModel.save_pretrained: every adapter (or ``selected_adapters``) in PEFT's layout, "default"
    at the root and the others in sub-directories, plus the README.md model card PEFT writes.

    ``state_dict`` and ``is_main_process`` are what ``transformers.Trainer`` passes at checkpoints.
    """
    if kwargs.pop("path_initial_model_for_weight_conversion", None) is not None:
        raise MiniLoraError("save_pretrained: path_initial_model_for_weight_conversion is for PiSSA / OLoRA / CorDA "
                            "adapters, which minilora does not have.")
    if kwargs:
        raise MiniLoraError(f"save_pretrained: minilora takes no {sorted(kwargs)} (pushing to a hub is out of "
                            "scope: use huggingface_hub's upload_folder on the saved directory).")
    if os.path.isfile(save_directory):
        raise MiniLoraError(f"Provided path ({save_directory}) should be a directory, not a file")
    names = list(adapter_configs(model)) if selected_adapters is None else list(selected_adapters)
    unknown = [name for name in names if name not in adapter_configs(model)]
    if unknown:
        raise MiniLoraError(f"You passed an invalid `selected_adapters` arguments, current supported adapter names "
                            f"are {list(adapter_configs(model))} - got {selected_adapters}.")
    if not is_main_process:
        return
    Path(save_directory).mkdir(parents=True, exist_ok=True)
    write_model_card(model, Path(save_directory))
    for name in names:
        adapters.save_adapter(model, multi.adapter_directory(save_directory, name),
                              safe_serialization=safe_serialization, state_dict=state_dict, adapter_name=name)


def write_model_card(model: nn.Module, directory: Path) -> None:
    """README.md as PEFT's ``create_or_update_model_card`` writes it: an existing card is kept and
    updated; its metadata says ``library_name: peft``, the tags and the base model."""
    from importlib.metadata import PackageNotFoundError, version

    from huggingface_hub import ModelCard, ModelCardData

    try:
        __version__ = version("minilora")
    except PackageNotFoundError:  # run from a source tree
        __version__ = "(source)"

    path = directory / "README.md"
    card = ModelCard.load(path) if path.exists() else ModelCard.from_template(ModelCardData())
    card.data["library_name"] = "peft"
    tags = set(getattr(model, "model_tags", None) or [])
    if hasattr(model, "config") and type(model).__module__.startswith("transformers"):
        tags.add("transformers")
    tags.add("lora")
    name_or_path = getattr(model, "name_or_path", None)
    if name_or_path is not None:
        tags.add(f"base_model:adapter:{name_or_path}")
    card.data["tags"] = sorted(tags)
    configs = adapter_configs(model)
    first = next(iter(configs.values()), None)
    task = getattr(getattr(first, "task_type", None), "value", getattr(first, "task_type", None))
    if not card.data.pipeline_tag and task == "CAUSAL_LM":
        card.data.pipeline_tag = "text-generation"
    config_dict = model.config.to_dict() if hasattr(getattr(model, "config", None), "to_dict") else {}
    if "_name_or_path" in config_dict:
        card.data["base_model"] = config_dict["_name_or_path"]
    lines = card.text.splitlines()
    line = f"- minilora {__version__} (adapters in PEFT's format)"
    if line not in lines:
        heading = "### Framework versions"
        if heading in lines:
            lines.insert(lines.index(heading) + 2, line)
        else:
            lines.append(f"{heading}\n\n{line}")
    card.text = "\n".join(lines)
    card.save(path)


def _merge_adapter(model: nn.Module, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
    """LoraModel.merge_adapter: fold the active adapters (or ``adapter_names``) into W0, layer by
    layer, keeping A and B (``unmerge_adapter`` takes them out again). Warns as PEFT when merged already."""
    if isinstance(adapter_names, str):
        raise MiniLoraError(f"adapter_names should be a list of strings, got {adapter_names!r}.")
    for _, layer in require_lora_layers(model, "merge_adapter"):
        layer.merge(safe=safe_merge, adapter_names=adapter_names)


def _unmerge_adapter(model: nn.Module) -> None:
    """LoraModel.unmerge_adapter: take every merged adapter out of W0 again (PEFT's warning if none is)."""
    for _, layer in require_lora_layers(model, "unmerge_adapter"):
        layer.unmerge()


def _disable_adapter_layers(model: nn.Module) -> None:
    """LoraModel.disable_adapter_layers: the base model's outputs; no adapter requires grad."""
    for name in multi.active_adapters(model):
        bias = getattr(adapter_configs(model).get(name), "bias", "none")
        if bias != "none":
            warnings.warn(f"Careful, disabling adapter layers with bias configured to be '{bias}' does not produce "
                          "the same output as the base model would without adaption.", stacklevel=3)
    multi.enable_adapters(model, False)


def _enable_adapter_layers(model: nn.Module) -> None:
    """LoraModel.enable_adapter_layers: the adapters are back, the active ones require grad."""
    multi.enable_adapters(model, True)


@contextlib.contextmanager
def _disable_adapter(model: nn.Module) -> Iterator[None]:
    """``with model.disable_adapter():`` the base model's outputs inside the block, as PEFT's.

    PEFT's details, kept: a merged layer is unmerged on the fly by its forward (so the block gives
    the base outputs and the model is unmerged afterwards); leaving the block enables every layer and
    makes the active adapters require grad, and it warns first if some layers were enabled and some not.
    """
    status = multi.model_status(model)
    if status.enabled == "irregular":
        warnings.warn("The model contains some adapter layers that are enabled and others that are disabled. "
                      "This is most likely unintentional. After exiting the disable_adapter context, all adapters "
                      "will be enabled", stacklevel=3)
    try:
        _disable_adapter_layers(model)
        yield
    finally:
        if status.enabled is not False:
            _enable_adapter_layers(model)


def _get_layer_status(model: nn.Module) -> list:
    """PeftModel.get_layer_status, with PEFT's names: module type "lora.Linear", and each layer's name
    as PEFT's LoraModel sees it (under ``model.``)."""
    return [dataclasses.replace(row, name=f"model.{row.name}")
            for row in multi.layer_status(model, module_type="lora.Linear")]


def _get_model_status(model: nn.Module):
    """PeftModel.get_model_status: what PEFT reports for this model (adapter_model_type "LoraModel")."""
    status = multi.model_status(model, _get_layer_status(model), adapter_model_type="LoraModel")
    return dataclasses.replace(status, base_model_type=type(model).__name__)


def _add_weighted_adapter(model: nn.Module, adapters: list[str], weights: list[float], adapter_name: str,
                          combination_type: str = "svd", svd_rank: Optional[int] = None, svd_clamp: Any = None,
                          svd_full_matrices: bool = True, svd_driver: Optional[str] = None, density: Any = None,
                          majority_sign_method: str = "total") -> None:
    """LoraModel.add_weighted_adapter (linear, cat, svd): see weighted.py."""
    if density is not None:
        raise MiniLoraError("add_weighted_adapter: density is for PEFT's ties / dare / magnitude_prune combinations, "
                            "which minilora does not have (it has linear, cat and svd).")
    add_weighted_adapter(model, adapters, weights, adapter_name, combination_type, svd_rank, svd_clamp,
                         svd_full_matrices, svd_driver)
    sync_attributes(model)


MULTI_ADAPTER_METHODS = {
    "add_weighted_adapter": _add_weighted_adapter,
    "add_adapter": _add_adapter,
    "set_adapter": _set_adapter,
    "delete_adapter": _delete_adapter,
    "load_adapter": _load_adapter,
    "save_pretrained": _save_pretrained,
    "merge_adapter": _merge_adapter,
    "unmerge_adapter": _unmerge_adapter,
    "disable_adapter_layers": _disable_adapter_layers,
    "enable_adapter_layers": _enable_adapter_layers,
    "disable_adapter": _disable_adapter,
    "get_layer_status": _get_layer_status,
    "get_model_status": _get_model_status,
}
ATTRIBUTES = ("peft_config", "active_adapter", "active_adapters")
