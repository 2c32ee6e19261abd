"""What ``minilora.compat`` does around loading so that a script gets PEFT's adapter and prints PEFT's
numbers: the train mode PEFT gives new layers and the freezing of ``inference_mode``, the random
numbers PEFT's second wrap draws, where an adapter named by a Hugging Face hub id is (the local cache,
fetched by ``huggingface_hub`` as PEFT fetches it), and the rules of ``PeftModel.from_pretrained`` and
``load_adapter`` (PEFT's are in peft/peft_model.py, with ``load_peft_weights`` and
``set_peft_model_state_dict`` in peft/utils/save_and_load.py): which options they take, the files read
once, and the configs that must agree with the saved one, checked before anything changes.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from . import adapters, compat_config
from .adapter_config import ADAPTER_FIELDS, config_from_fields
from .compat_config import check_config
from .config import LoraConfig, MiniLoraError
from .inject import adapter_configs, lora_layers, mark_biases_trainable, set_adapter_config
from .saved_modules import saved_modules


# --------------------------------------------------------------------------------------------
# PEFT's side effects that a script's later numbers depend on
# --------------------------------------------------------------------------------------------
def lora_layer_ids(model: nn.Module) -> set[int]:
    """The LoRA layers and modules_to_save wrappers there are now (``leave_new_layers_in_train_mode``'s ``before``)."""
    return {id(module) for _, module in (*lora_layers(model), *saved_modules(model))}


def _is_new(module: nn.Module, before: set[int] | None) -> bool:
    """``module`` was not there ``before`` (ids from ``lora_layer_ids``; None: every module counts as new)."""
    return before is None or id(module) not in before


def unmerge_as_pefts_injection(model: nn.Module) -> None:
    """PEFT's ``inject_adapter`` (add_adapter, add_weighted_adapter, load_adapter) ends with ``set_adapter`` of the
    model's active adapters, which unmerges every merged LoRA layer, with its warning for each: after a new adapter
    the model is unmerged (peft/tuners/tuners_utils.py, BaseTuner.inject_adapter, "HOUSEKEEPING"). Every layer then
    has the model's active adapters (those of the first LoRA layer), also a layer that delete_adapter gave one of
    its own (PEFT's layers each pick their next adapter; the first one's pick is the model's)."""
    layers = list(lora_layers(model))
    active = list(layers[0][1].active_adapters) if layers else []
    for _, layer in layers:
        if layer.merged:
            warnings.warn("Adapter cannot be set when the model is merged. Unmerging the model first.", stacklevel=3)
            layer.unmerge()
        layer.active_adapters = list(active)  # (requires_grad: PEFT restores what the parameters had)


def train_new_lora_biases_if_bias_all(model: nn.Module, adapter_name: str) -> None:
    """PEFT's injection of a further adapter ends with its bias marking: with bias="all" on an active adapter every
    parameter named ``*.bias`` trains, and of the parameters that existed before it restores requires_grad, so the
    new adapter's own lora_B biases (lora_bias=True) train even while it is inactive (BaseTuner.inject_adapter)."""
    configs = adapter_configs(model)
    active = {name for _, layer in lora_layers(model) for name in layer.active_adapters}
    if not any(getattr(configs.get(name), "bias", "none") == "all" for name in active):
        return
    for _, layer in lora_layers(model):
        if adapter_name in layer.lora_A:
            for module in (layer.lora_A[adapter_name], layer.lora_B[adapter_name]):
                if getattr(module, "bias", None) is not None:
                    module.bias.requires_grad_(True)


def leave_new_layers_in_train_mode(model: nn.Module, adapter_name: str, before: set[int] | None = None) -> None:
    """PEFT's new LoRA modules start in train mode even inside an eval() model (dropout on until the
    next .eval()); minilora's own inject follows the model's mode instead (the safer choice,
    README "Train and eval mode"). compat does what PEFT does, so a script that never calls
    .train() / .eval() draws the same dropout masks, and prints the same numbers, as with PEFT.
    A layer built for this adapter starts in train mode but for its base layer; in a layer that holds
    other adapters too, only this adapter's A, B and dropout do (add_adapter), and so in a layer that was
    there ``before`` (ids, ``lora_layer_ids``) and holds no other adapter now (they were deleted)."""
    for _, layer in lora_layers(model):
        if list(layer.lora_A) == [adapter_name] and _is_new(layer, before):
            base_mode = layer.base_layer.training
            layer.train(True)
            layer.base_layer.train(base_mode)
        elif adapter_name in layer.lora_A:
            for table in (layer.lora_A, layer.lora_B, layer.lora_dropout):
                table[adapter_name].train(True)
    leave_new_wrappers_in_train_mode(model, adapter_name, before)


def after_pefts_injection(model: nn.Module, adapter_name: str, before: set[int]) -> None:
    """What PEFT's injection of a further adapter does after building it (add_adapter, add_weighted_adapter):
    merged layers unmerged, new lora_B biases trained under bias="all", new modules in train mode (the three
    functions above; ``before``: ``lora_layer_ids`` taken before the adapter was added)."""
    unmerge_as_pefts_injection(model)
    train_new_lora_biases_if_bias_all(model, adapter_name)
    leave_new_layers_in_train_mode(model, adapter_name, before)


def leave_new_wrappers_in_train_mode(model: nn.Module, adapter_name: str, before: set[int] | None = None) -> None:
    """The same for new modules_to_save wrappers: the wrapper and its dict of copies start in train mode
    in PEFT (the copies themselves keep the module's mode); a wrapper there ``before`` (one a deleted adapter
    left holding no copy) is not new."""
    for _, wrapper in saved_modules(model):
        if list(wrapper.modules_to_save) == [adapter_name] and _is_new(wrapper, before):
            wrapper.training = wrapper.modules_to_save.training = True


def freeze_for_inference(model: nn.Module, bias: str) -> None:
    """PEFT's ``inference_mode`` (and loading with ``is_trainable=False``): A, B and the modules_to_save
    copies are frozen, but with ``bias="all"`` / ``"lora_only"`` the biases still require grad, since
    PEFT marks them trainable whatever the mode (its ``_mark_only_adapters_as_trainable``)."""
    for param in model.parameters():
        param.requires_grad_(False)
    mark_biases_trainable(model, bias)
    for _, wrapper in saved_modules(model):  # then the wrappers freeze theirs (a bias shared with one too)
        wrapper.requires_grad_(False)


def draw_like_peft_rewrap(model: nn.Module, adapter_name: str, config: LoraConfig) -> None:
    """``PeftModel.from_pretrained`` on a model that has its LoRA layers already (pitfall 1) makes
    PEFT wrap it again: each layer's adapter is rebuilt, drawing A and B from the default random
    generator, before the files are read. minilora loads into the layers instead, and draws the
    same numbers here, so that every random number the script draws afterwards is PEFT's. ``config``:
    the adapter's, as read from its files."""
    for _, layer in lora_layers(model):
        if adapter_name not in layer.lora_A:
            continue
        r = layer.r[adapter_name]
        weight_A = nn.Linear(layer.in_features, r, bias=False).weight  # nn.Linear's own init: A, then B
        nn.Linear(r, layer.out_features, bias=False)
        with torch.no_grad():
            if config.init_lora_weights is True:
                nn.init.kaiming_uniform_(weight_A, a=math.sqrt(5))
            elif config.init_lora_weights == "gaussian":
                nn.init.normal_(weight_A, std=1 / r)


@contextlib.contextmanager
def drawing_nothing(enabled: bool = True) -> Iterator[None]:
    """Inside the block, building adapters leaves torch's default generator as it was: PEFT's
    ``low_cpu_mem_usage=True`` builds them on the meta device, which draws no random numbers (the
    weights are loaded right after). minilora builds real ones and puts the generator back."""
    state = torch.get_rng_state() if enabled else None
    try:
        yield
    finally:
        if state is not None:
            torch.set_rng_state(state)


def adapter_on_meta(model: nn.Module, adapter_name: str) -> None:
    """PEFT's ``low_cpu_mem_usage=True`` for a new adapter that is not loaded in the same call
    (``get_peft_model``, ``add_adapter``, ``inject_adapter_in_model``): its A and B are placeholders on the
    meta device (no memory) until ``set_peft_model_state_dict`` loads them; a forward that uses them before
    that is a MiniLoraError (LoraLinear.forward; PEFT's gives meaningless numbers)."""
    from .inject import lora_layers

    for _, layer in lora_layers(model):
        if adapter_name in layer.lora_A:
            layer.lora_A[adapter_name].to("meta")
            layer.lora_B[adapter_name].to("meta")


# --------------------------------------------------------------------------------------------
# Where an adapter is: a directory, or a Hugging Face hub id
# --------------------------------------------------------------------------------------------
HUB_OPTIONS = ("subfolder", "revision", "cache_dir", "token", "local_files_only")


def resolve_adapter_source(model_id: str | os.PathLike, kwargs: dict, action: str) -> Path:
    """The local directory of adapter ``model_id``: the directory itself (``/subfolder``), or, for a
    hub id, the files in the Hugging Face cache, fetched by ``huggingface_hub`` as PEFT fetches them
    (offline, ``HF_HUB_OFFLINE=1``, they must be in the cache already).

    Raises:
        MiniLoraError: for options minilora does not take, or an id that is neither a directory nor
            (with network off) in the cache.
    """
    options = {name: kwargs.pop(name) for name in HUB_OPTIONS if name in kwargs}
    if kwargs:
        raise MiniLoraError(f"{action}: minilora takes no {sorted(kwargs)} (it knows {list(HUB_OPTIONS)}).")
    if not isinstance(model_id, (str, os.PathLike)):
        raise MiniLoraError(f"{action} needs an adapter directory or a hub id (a str or Path), got "
                            f"{type(model_id).__name__}.")
    subfolder = options.get("subfolder")
    if subfolder is not None and (not isinstance(subfolder, str) or Path(subfolder).is_absolute()
                                  or ".." in Path(subfolder.replace("\\", "/")).parts):
        raise MiniLoraError(f"{action}: subfolder={subfolder!r} must be a folder inside {str(model_id)!r} (a relative "
                            "path without '..'). Pass the folder itself as the adapter's path instead.")
    local = Path(model_id) / subfolder if subfolder else Path(model_id)
    if local.exists() or not isinstance(model_id, str) or model_id.startswith((".", "/", "~")):
        return local  # a directory (load_adapter explains what is wrong with it, if anything)
    return _from_hub(model_id, options, action)


def _from_hub(repo_id: str, options: dict, action: str) -> Path:
    """The cached directory that holds adapter_config.json and the weights of hub repository ``repo_id``."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import HFValidationError

    download = dict(repo_id=repo_id, subfolder=options.get("subfolder"), revision=options.get("revision"),
                    cache_dir=options.get("cache_dir"), token=options.get("token"),
                    local_files_only=options.get("local_files_only", False))
    try:
        config_path = hf_hub_download(filename=adapters.CONFIG_NAME, **download)
        try:
            hf_hub_download(filename=adapters.WEIGHTS_NAME, **download)
        except Exception:  # an older adapter: adapter_model.bin only
            hf_hub_download(filename=adapters.LEGACY_WEIGHTS_NAME, **download)
    except HFValidationError:
        raise MiniLoraError(f"{action}: {repo_id!r} is not a directory, and not a valid hub id either. Pass the "
                            "directory save_pretrained wrote, or a hub id such as 'user/adapter'.") from None
    except Exception as error:  # offline and not cached, no such repository, no network, ...
        offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
        raise MiniLoraError(
            f"{action}: {repo_id!r} is not a local directory, and its files could not be had from the Hugging Face "
            f"hub{' cache (HF_HUB_OFFLINE is set)' if offline else ''} ({type(error).__name__}: {error}). Pass the "
            "directory save_pretrained wrote, or download the adapter first (huggingface-cli download "
            f"{repo_id})." ) from None
    return Path(config_path).parent


# --------------------------------------------------------------------------------------------
# Loading's rules: PEFT's options, the files read once, configs that must agree
# --------------------------------------------------------------------------------------------
def check_flag(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise MiniLoraError(f"{name} must be True or False (a bool), got {value!r}.")


def check_load_options(autocast_adapter_dtype: object, ephemeral_gpu_offload: object, low_cpu_mem_usage: object,
                       key_mapping: object, kwargs: dict) -> None:
    """PEFT's loading options: the flags are bools; ``torch_device`` and ``device_map`` name one device
    (as in PEFT the model stays where it is: move it with ``.to()``); the rest is refused."""
    check_flag("autocast_adapter_dtype", autocast_adapter_dtype)
    check_flag("low_cpu_mem_usage", low_cpu_mem_usage)
    if ephemeral_gpu_offload is not False:
        raise MiniLoraError("ephemeral_gpu_offload is for models offloaded across devices (accelerate), which "
                            "minilora does not support. Leave it False.")
    if key_mapping:
        raise MiniLoraError("key_mapping (renaming a checkpoint's keys) is not in minilora: the adapter's keys must "
                            "name this model's layers.")
    for name in ("torch_device", "device_map"):
        value = kwargs.pop(name, None)
        if isinstance(value, dict) and list(value) == [""]:
            value = value[""]
        try:
            if value is not None:
                torch.device(value)
        except (RuntimeError, TypeError):
            raise MiniLoraError(f"{name}={value!r}: minilora loads onto one device (None, 'cpu', 'cuda:0', ...); "
                                "it does not dispatch a model across devices ('auto', 'balanced', several "
                                "entries).") from None


def read_files(model: nn.Module, directory: Path) -> adapters.AdapterFiles:
    """The adapter's files, read once (a safetensors file: its header; load_adapter reads the values it loads)."""
    if not isinstance(model, nn.Module):
        raise MiniLoraError(f"load_adapter(model, source) needs the model (an nn.Module) first, got "
                            f"{type(model).__name__}.")
    return adapters.read_adapter_files(directory)


def check_task_head_saved(model: nn.Module, task_class: type, saved: LoraConfig, directory: Path) -> None:
    """A task class with a head (PeftModelForSequenceClassification: ``classifier`` / ``score``, ...) adds
    it to modules_to_save before loading, in PEFT, and then fails (a KeyError) where the file holds no
    saved copy of it: refused here, before anything changes."""
    saved_names = saved.modules_to_save or []
    missing = [name for name, _ in model.named_modules() if any(name.endswith(head) for head in task_class.TASK_HEADS)
               and not any(name.endswith(kept) for kept in saved_names)]
    if missing:
        raise MiniLoraError(f"{task_class.__name__} trains and loads the task head {missing[0]!r} (modules_to_save), "
                            f"but {directory} saved no copy of it (its modules_to_save: {saved_names}); PEFT fails "
                            "here (a KeyError). Load with PeftModel.from_pretrained and no config=, or a config= "
                            "whose task_type matches the saved adapter's.")


def check_given_config(config: Any, saved: Any, directory: Path) -> None:
    """``from_pretrained(config=...)`` must describe the saved adapter: minilora loads strictly. (Its
    init_lora_weights must agree too: PEFT builds the adapter with it before loading, and that draws
    from the random generator.) Training settings such as lora_dropout may differ: the config's hold."""
    check_config(config, "PeftModel.from_pretrained(config=...)")
    different = _differing_fields(config, saved)
    if different:
        raise MiniLoraError(f"config= differs from {directory}/adapter_config.json in {different}; the saved "
                            "weights were made with the saved config. Pass config=None, or the saved config.")


def _differing_fields(config: Any, saved: Any) -> list[str]:
    """The fields that shape the adapter's numbers (ADAPTER_FIELDS) in which two configs differ."""
    def comparable(value: Any) -> Any:  # (PEFT's config keeps a set of target names; a file has a list)
        return sorted(value) if isinstance(value, (set, list)) else value

    return [name for name in ADAPTER_FIELDS if comparable(getattr(config, name)) != comparable(getattr(saved, name))]


def pefts_config(fields: dict, source: str) -> compat_config.LoraConfig:
    """The compat ``LoraConfig`` of an adapter's config fields (every PEFT field), made before loading,
    so that a field only this config checks is refused before anything changes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the loader warns about the file's fields)
        return compat_config.LoraConfig.from_fields(fields, source)


def keep_pefts_config(model: nn.Module, adapter_name: str, config: compat_config.LoraConfig,
                      is_trainable: bool, before: set[int] | None = None) -> None:
    """After loading, the adapter's config is the compat ``LoraConfig`` read from the same file (every
    PEFT field: task_type, base_model_name_or_path, use_dora, ...), as PEFT's ``peft_config[name]`` is,
    with ``inference_mode = not is_trainable`` as PEFT sets it and the fan_in_fan_out its injection sets;
    minilora's loader recorded its own LoRA-only config."""
    config.inference_mode = not is_trainable
    keep_the_layout_injection_set(model, adapter_name, config, before)
    set_adapter_config(model, adapter_name, config)


def keep_the_layout_injection_set(model: nn.Module, adapter_name: str, config: compat_config.LoraConfig,
                                  before: set[int] | None = None) -> None:
    """PEFT's injection sets the config's fan_in_fan_out to the layout of each new LoRA layer it builds (Conv1D:
    True), so a loaded adapter's config ends with the last new layer's layout, not with the file's value (a layer
    that held another adapter ``before``, ids from ``lora_layer_ids``, is not new)."""
    from transformers.pytorch_utils import Conv1D

    new = [layer for _, layer in lora_layers(model)
           if adapter_name in layer.lora_A and _is_new(layer, before)]
    if new:
        config.fan_in_fan_out = isinstance(new[-1].base_layer, Conv1D)


def refuse_base_weights_into_merged_layers(model: nn.Module, files: adapters.AdapterFiles) -> None:
    """A new adapter loaded into a merged model: PEFT unmerges the model first (its injection), then writes the
    file's base weights (``<layer>.base_layer.weight``, which save_embedding_layers stores for lm_head) into W0, so
    a layer merged when the file was saved ends with its dW inside W0 while unmerged. minilora loads, then
    unmerges: a different W0. Refused before anything changes."""
    merged = {name for name, layer in lora_layers(model) if layer.merged}
    keys = [key for key in files.tensors if isinstance(key, str) and key.endswith(".base_layer.weight")
            and key.removeprefix("base_model.model.").removesuffix(".base_layer.weight") in merged]
    if keys:
        raise MiniLoraError(f"{files.weights_path} holds the base weights {keys[:3]} of layers that are merged now: "
                            "PEFT unmerges them and then writes those weights into W0, which leaves a saved update "
                            "inside W0. Call unmerge_adapter() first.")


def upcast_adapter(model: nn.Module, adapter_name: str) -> None:
    """PEFT's ``load_adapter`` ends with ``_cast_adapter_dtype`` (autocast_adapter_dtype=True), also for an adapter the
    model had already: its float16 / bfloat16 A and B (after ``model.to(torch.bfloat16)``) become float32, in place
    (``param.data``, as PEFT's cast_adapter_dtype)."""
    for _, layer in lora_layers(model):
        if adapter_name in layer.lora_A:
            for module in (layer.lora_A[adapter_name], layer.lora_B[adapter_name]):
                for param in module.parameters():
                    if param.dtype in (torch.float16, torch.bfloat16):
                        param.data = param.data.to(torch.float32)


def load_into_existing_adapter(model: nn.Module, files: adapters.AdapterFiles, adapter_name: str) -> None:
    """PEFT's ``load_adapter`` for a name the model has already: only the weights are read in (its
    ``set_peft_model_state_dict``); the adapter's config, and which parameters train, stay as they were.

    Raises:
        MiniLoraError: when the saved config would compute something else (another lora_alpha, other
            targets, ...): PEFT would load A and B and keep the model's scaling, without a word.
    """
    try:  # (the weights file is closed once read, or refused, as load_adapter closes it)
        different = _differing_fields(adapter_configs(model)[adapter_name],
                                      config_from_fields(files.fields, files.config_origin))
        if different:
            raise MiniLoraError(f"{files.config_origin} differs from adapter {adapter_name!r} in the model in "
                                f"{different}; PEFT would load its A and B and keep the model's {different}. Load "
                                "it under a new adapter_name, or into a model made with the saved config.")
        if not files.paired:
            adapters.refuse_unpaired_config(files.directory / adapters.CONFIG_NAME, files.weights_path)
        adapters.check_file_keys(files.tensors, adapter_name, str(files.weights_path), from_file=True)
        tensors = adapters.read_for_existing_adapter(model, files, adapter_name)  # (names and shapes checked first)
    finally:
        files.close()
    trains = {param: param.requires_grad for param in model.parameters()}
    adapters.load_adapter(model, tensors, adapter_name=adapter_name)  # (a dict of tensors: the model's config stays)
    for param, requires_grad in trains.items():
        param.requires_grad_(requires_grad)
