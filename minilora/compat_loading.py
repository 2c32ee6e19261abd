"""What ``minilora.compat`` does around loading so that a script prints PEFT's numbers: the train
mode PEFT gives new layers, the random numbers PEFT's second wrap draws, and where an adapter named
by a Hugging Face hub id is (the local cache, fetched by ``huggingface_hub`` as PEFT fetches it).
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from . import adapters
from .config import LoraConfig, MiniLoraError
from .inject import lora_layers
from .saved_modules import saved_modules


# --------------------------------------------------------------------------------------------
# PEFT's side effects that a script's later numbers depend on
# --------------------------------------------------------------------------------------------
def leave_new_layers_in_train_mode(model: nn.Module, adapter_name: str) -> None:
    """PEFT's new LoRA modules start in train mode even inside an eval() model (dropout on until the
    next .eval()); minilora's own inject follows the model's mode instead (the safer choice,
    README "Train and eval mode"). compat does what PEFT does, so a script that never calls
    .train() / .eval() draws the same dropout masks, and prints the same numbers, as with PEFT.
    A layer built for this adapter starts in train mode but for its base layer; in a layer that holds
    other adapters too, only this adapter's A, B and dropout do (add_adapter)."""
    for _, layer in lora_layers(model):
        if list(layer.lora_A) == [adapter_name]:
            base_mode = layer.base_layer.training
            layer.train(True)
            layer.base_layer.train(base_mode)
        elif adapter_name in layer.lora_A:
            for table in (layer.lora_A, layer.lora_B, layer.lora_dropout):
                table[adapter_name].train(True)
    leave_new_wrappers_in_train_mode(model, adapter_name)


def leave_new_wrappers_in_train_mode(model: nn.Module, adapter_name: str) -> None:
    """The same for new modules_to_save wrappers: the wrapper and its dict of copies start in train mode
    in PEFT (the copies themselves keep the module's mode)."""
    for _, wrapper in saved_modules(model):
        if list(wrapper.modules_to_save) == [adapter_name]:
            wrapper.training = wrapper.modules_to_save.training = True


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


