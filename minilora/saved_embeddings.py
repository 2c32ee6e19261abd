"""``save_embedding_layers``: when an adapter file also holds the model's own embedding weights.

An adapter file normally holds A and B only; W0 comes from the base model. Two cases break that, and
PEFT then saves the embedding layers' *base* weights with the adapter (``save_pretrained(...,
save_embedding_layers="auto")``, the default), so that the file still loads onto a plain base model:

- an embedding layer is a LoRA target (``target_modules`` names ``lm_head`` or ``embed_tokens``):
  the file gets that layer's base weight, ``base_model.model.lm_head.base_layer.weight``;
- the vocabulary was resized (``resize_token_embeddings``): the base model's checkpoint no longer
  fits, so the file gets both embedding layers whole, ``base_model.model.transformer.wte.weight`` and
  ``base_model.model.lm_head.weight`` (GPT-2 ties the two: the same values under both keys).

``save_embedding_layers=True`` saves them always (the second form unless an embedding layer is a
target), ``False`` never. Loading (PEFT's and minilora's) copies such keys into the base model's
layers (a tied pair: into both, since they share one tensor): ``loadable_keys`` below says which keys
a file may hold for a model, adapter_checks.saved_embedding_weights checks their tensors.

This file mirrors PEFT 0.21.2's rules (``peft/utils/save_and_load.py::get_peft_model_state_dict``,
"DEAL WITH EMBEDDINGS") and its warnings, word for word:

    save_embedding_layers="auto":
        an embedding layer is targeted       -> True, warning TARGETED
        config.vocab_size != the vocab_size in the base model's config.json (base_model_name_or_path)
                                             -> True, warning RESIZED
        otherwise                            -> False
        (PEFT's exception for trainable tokens does not arise: minilora refuses trainable_token_indices)
    True, and the model has get_input_embeddings (a transformers model), for its input and output
    embedding layers:
        targeted: each one that is a LoRA layer over nn.Linear / nn.Embedding: "<name>.base_layer.*"
        not targeted: each one, whole: "<name>.*"; for one in ``modules_to_save`` that is the wrapper's
            state, "<name>.original_module.*" and "<name>.modules_to_save.*" (this adapter's copy, its
            name dropped), next to the copy that every such file holds as "<name>.*"
    True, and no get_input_embeddings: nothing, warning NOT_TRANSFORMERS

PEFT's loading puts "<name>.original_module.*" into the original (the base embedding of the resized
vocabulary) and ignores "<name>.modules_to_save.*" (no parameter has that name once the adapter's
name is added back); minilora's does the same (``wrapped_embedding_keys``).

Refused (MiniLoraError, before anything is written): a value other than True, False, "auto".
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from . import bounded_regex
from .adapter_files import file_key
from .compat_tying import EMBEDDING_LAYER_NAMES
from .config import MiniLoraError
from .inject import adapter_configs
from .layer import LoraLinear
from .saved_modules import ModulesToSave
from .targets import resolve_target_modules

TARGETED = "Setting `save_embedding_layers` to `True` as embedding layers found in `target_modules`."
RESIZED = "Setting `save_embedding_layers` to `True` as the embedding layer has been resized during finetuning."
NOT_TRANSFORMERS = "Could not identify embedding layer(s) because the model is not a 🤗 transformers model."
NO_BASE_CONFIG = "Could not find a config file in {} - will assume that the vocabulary was not modified."
HUB_LOOKUP_FAILED = ("Unable to fetch remote file due to the following error {} - silently ignoring the lookup"
                     " for the file config.json in {}.")


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------
def check_value(save_embedding_layers: Any) -> None:
    """PEFT documents True, False or "auto"; anything else (e.g. the string "false", which PEFT would
    take as True) is refused."""
    if save_embedding_layers != "auto" and not isinstance(save_embedding_layers, bool):
        raise MiniLoraError(f"save_embedding_layers must be True, False or 'auto', got {save_embedding_layers!r}.")


def embedding_is_targeted(model: nn.Module, targets: Any) -> bool:
    """PEFT's test on the config's ``target_modules``: a list names ``lm_head`` or ``embed_tokens``
    exactly; a regex (not "all-linear") matches the full name of a module of ``model`` whose last
    part is one of them."""
    if isinstance(targets, str) and targets != "all-linear":
        return any(bounded_regex.fullmatch(targets, name) for name, _ in model.named_modules()
                   if any(name == e or name.endswith(f".{e}") for e in EMBEDDING_LAYER_NAMES))
    return bool(targets) and any(e in targets for e in EMBEDDING_LAYER_NAMES)


def decide(model: nn.Module, targets: Any, model_id: str | None, save_embedding_layers: Any) -> tuple[bool, bool]:
    """(save the embedding layers?, is one targeted?), with PEFT's warnings.

    Args:
        model: your model (with its minilora layers).
        targets: the config's ``target_modules`` as PEFT's config holds them after injection.
        model_id: the config's ``base_model_name_or_path``: its config.json says the original vocab_size.
    """
    check_value(save_embedding_layers)
    targeted = embedding_is_targeted(model, targets)
    if save_embedding_layers != "auto":
        return save_embedding_layers, targeted
    if targeted:
        warnings.warn(TARGETED)
        return True, targeted
    resized = _vocabulary_resized(model, model_id)
    if resized:
        warnings.warn(RESIZED)
    return resized, targeted


def _vocabulary_resized(model: nn.Module, model_id: str | None) -> bool:
    """``config.vocab_size`` differs from the one in ``model_id``'s config.json (a local directory,
    or a hub id looked up as PEFT does: not at all with HF_HUB_OFFLINE set)."""
    vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
    has_base_config = False
    if model_id:
        exists = os.path.exists(os.path.join(model_id, "config.json")) or _config_on_hub(model_id)
        if exists is None:
            warnings.warn(NO_BASE_CONFIG.format(model_id))
        has_base_config = bool(exists)
    return bool(vocab_size and model_id and has_base_config
                and vocab_size != type(model.config).from_pretrained(model_id).vocab_size)


def _config_on_hub(model_id: str) -> bool | None:
    """PEFT's ``check_file_exists_on_hf_hub(model_id, "config.json")``: None when it cannot tell."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("y", "yes", "t", "true", "on", "1"):
        return None
    from huggingface_hub import file_exists
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError
    try:
        return file_exists(model_id, "config.json")
    except (HFValidationError, EntryNotFoundError):
        return None
    except Exception as error:  # (PEFT's words: no network, ...)
        warnings.warn(HUB_LOOKUP_FAILED.format(error, model_id))
        return None


def embedding_modules(model: nn.Module, targeted: bool) -> list[str]:
    """The names of the modules whose whole state PEFT adds to the file (``save_embedding_layers``
    decided True): ``["lm_head.base_layer"]`` for a targeted lm_head, ``["transformer.wte", "lm_head"]``
    for a resized GPT-2 (also when they are in ``modules_to_save``: then their state is the wrapper's,
    ``original_module.weight`` and ``modules_to_save.<adapter>.weight``).

    Raises:
        MiniLoraError: the model's ``get_input_embeddings`` fails.
    """
    if not hasattr(model, "get_input_embeddings"):
        warnings.warn(NOT_TRANSFORMERS)
        return []
    try:
        layers = [model.get_input_embeddings(), model.get_output_embeddings()]
    except (NotImplementedError, AttributeError) as error:
        raise MiniLoraError(f"save_embedding_layers: {type(model).__name__}.get_input_embeddings / "
                            f"get_output_embeddings failed ({error}), so the embedding layers cannot be found "
                            "(PEFT fails here too). Pass save_embedding_layers=False.") from error
    names = []
    for layer in layers:
        base = getattr(layer, "base_layer", None)
        if targeted and not isinstance(base, (nn.Linear, nn.Embedding)):
            continue  # (targeted: only LoRA layers' base weights are saved)
        name = next((name for name, module in model.named_modules()
                     if (not targeted and module is layer) or (base is not None and module is base)), None)
        if name is not None:
            names.append(name)
    return names


def embedding_state(state: Mapping[str, torch.Tensor], names: list[str], adapter_name: str,
                    other_adapters: list[str]) -> dict[str, torch.Tensor]:
    """The entries of ``state`` (your model's keys) under the modules ``names``, as PEFT takes them:
    every key under ``<name>.``, except other adapters' (a key holding ``.<other>.`` or ending in
    ``.<other>``: PEFT's filter), under the file's key (``file_key``). A LoRA layer's own A
    and B are among them, under the same keys as the adapter's (the caller keeps one of each)."""
    def others(key: str) -> bool:
        return any(f".{other}." in key or key.endswith(f".{other}") for other in other_adapters)

    return {file_key(key, adapter_name): value for name in names for key, value in state.items()
            if key.startswith(f"{name}.") and not others(key)}


def saved_embedding_state(model: nn.Module, state: Mapping[str, torch.Tensor], config: Any, adapter_name: str,
                          save_embedding_layers: Any = "auto") -> dict[str, torch.Tensor]:
    """What PEFT adds to the file of adapter ``adapter_name`` for ``save_embedding_layers``, under the
    file's keys (without ``base_model.model.``), taken from ``state``; ``{}`` when it adds nothing."""
    model_id = (config.base_model_name_or_path if hasattr(config, "base_model_name_or_path")  # compat's config
                else getattr(model, "name_or_path", None))  # (as adapter_config.json records it)
    save, targeted = decide(model, resolve_target_modules(model, config), model_id, save_embedding_layers)
    if not save:
        return {}
    others = [name for name in adapter_configs(model) if name != adapter_name]
    return embedding_state(state, embedding_modules(model, targeted), adapter_name, others)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def embedding_layer_names(model: nn.Module) -> list[str]:
    """The names of the model's input and output embedding layers (``get_input_embeddings`` /
    ``get_output_embeddings``; a saved module's wrapper under its own name), [] where it has none."""
    layers: list[Any] = []
    if hasattr(model, "get_input_embeddings"):
        try:
            layers = [model.get_input_embeddings(), model.get_output_embeddings()]
        except (NotImplementedError, AttributeError):
            layers = []
    return [name for name, module in model.named_modules() if any(module is layer for layer in layers)]


def loadable_keys(model: nn.Module, lora_targets: list[str], saved_names: Sequence[str] = ()
                  ) -> dict[str, tuple[str, str]]:
    """The keys (your model's) under which a file may hold embedding weights for ``model``, each ->
    (module name, "weight" or "bias"), in the model's module order (for a tied pair, PEFT's loading
    writes the later one last). ``lora_targets``: the layers that hold, or will hold, LoRA layers;
    ``saved_names``: the modules that are, or will be, in ``modules_to_save``.

    A LoRA target whose last name part is lm_head / embed_tokens, or an input / output embedding that
    is (or becomes) a LoRA layer: ``<name>.base_layer.weight`` (and ``.bias``); an input / output
    embedding that stays plain: ``<name>.weight`` (and ``.bias``); one in ``modules_to_save``:
    ``<name>.original_module.weight`` (and ``.bias``), for its original (``base_tensor``).
    """
    names = [name for name in lora_targets if name.split(".")[-1] in EMBEDDING_LAYER_NAMES]
    names += embedding_layer_names(model)
    order = {name: index for index, (name, _) in enumerate(model.named_modules())}
    keys = {}
    for name in sorted(set(names), key=lambda name: order.get(name, -1)):
        module = model.get_submodule(name)
        if isinstance(module, ModulesToSave) or name in saved_names:
            keys.update(wrapped_embedding_keys(model, [name])[0])
            continue
        lora = name in lora_targets or isinstance(module, LoraLinear)
        for attribute in ("weight", "bias"):
            if isinstance(getattr(module, attribute, None), torch.Tensor):
                keys[f"{name}.base_layer.{attribute}" if lora else f"{name}.{attribute}"] = (name, attribute)
    return keys


def wrapped_embedding_keys(model: nn.Module, saved_names: Sequence[str]) -> tuple[dict[str, tuple[str, str]],
                                                                                   list[str]]:
    """The wrapper's keys that PEFT's files hold for an input / output embedding layer in
    ``modules_to_save`` (``saved_names``: wrapped already or not yet): ``<name>.original_module.weight``
    (and ``.bias``) -> (name, attribute), which PEFT's loading copies into the original, and the list of
    ``<name>.modules_to_save.weight`` (and ``.bias``), which PEFT's loading ignores: it adds the
    adapter's name back to ``<name>.weight`` only, so no parameter has that name."""
    loaded, ignored = {}, []
    for name in embedding_layer_names(model):
        if name not in saved_names:
            continue
        for attribute in ("weight", "bias"):
            if isinstance(base_tensor(model, name, attribute), torch.Tensor):
                loaded[f"{name}.original_module.{attribute}"] = (name, attribute)
                ignored.append(f"{name}.modules_to_save.{attribute}")
    return loaded, ignored


def base_tensor(model: nn.Module, name: str, attribute: str) -> Any:
    """The base model's tensor that a loaded embedding key goes into: ``attribute`` of the module
    ``name``, or of its original where it is in ``modules_to_save`` (a wrapper's ``weight`` is its
    active copy's)."""
    module = model.get_submodule(name)
    return getattr(module.original_module if isinstance(module, ModulesToSave) else module, attribute, None)
