"""PEFT's API as a drop-in: code written for PEFT runs on minilora with one changed import.

    from minilora.compat import get_peft_model, LoraConfig, TaskType, PeftModel

    config = LoraConfig(task_type=TaskType.CAUSAL_LM, inference_mode=False, r=8, lora_alpha=32, lora_dropout=0.1)
    model = get_peft_model(model, config)
    model.print_trainable_parameters()   # trainable params: 294,912 || all params: 124,734,720 || trainable%: 0.2364
    ...                                  # train, e.g. with transformers.Trainer
    model.save_pretrained("out")         # adapter_config.json + adapter_model.safetensors, PEFT's format
    model = PeftModel.from_pretrained(base_model, "out")
    model = model.merge_and_unload()

The one difference: ``get_peft_model`` returns the model you passed, with LoRA injected in place, not
a wrapper around it. PEFT's methods (``print_trainable_parameters``, ``save_pretrained``,
``merge_and_unload``, ...) are set on that object as attributes (see ``PEFT_METHODS``); its class,
its ``state_dict`` keys and its ``forward`` are the model's own. Because there is no wrapper, there is
nothing to wrap twice, and PEFT's two classic pitfalls go away:

1. ``get_peft_model(model, config)`` followed by ``PeftModel.from_pretrained(model, directory)``:
   PEFT wraps the model a second time and gives the base model's outputs (with a "missing adapter
   keys" warning in recent releases). Here ``from_pretrained`` finds the LoRA layers already in the
   model and loads the trained A and B into them.
2. ``torch.save(model)`` (the whole model object) mixed up with loading weights: every loading
   function here, and ``model.load_state_dict`` on a model from ``get_peft_model``, raises a
   MiniLoraError that explains the two consistent save/load pairs.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from . import adapters
from .adapter_config import check_unsupported, read_adapter_config
from .config import LoraConfig as _MiniLoraConfig
from .config import MiniLoraError
from .compat_adapters import ATTRIBUTES, MULTI_ADAPTER_METHODS, sync_attributes
from .inject import inject, lora_layers, merge_and_unload, unload
from .mixed import accept_adapter_names, generate_with_adapter_names, refuse_adapter_names
from .params import count_parameters, print_trainable_parameters


class TaskType(str, enum.Enum):
    """PEFT's task types (the same strings). minilora records the task in adapter_config.json only."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


@dataclass
class LoraConfig(_MiniLoraConfig):
    """``minilora.LoraConfig`` plus the PEFT fields that articles pass.

    ``task_type``, ``inference_mode``, ``base_model_name_or_path`` and ``revision`` are recorded (and
    ``inference_mode=True`` freezes the adapter, as in PEFT). The other fields are PEFT features
    minilora does not have: their defaults mean "not used", and using one is a MiniLoraError rather
    than an adapter that silently computes something else.
    """

    task_type: Optional[str] = None
    inference_mode: bool = False
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    use_dora: bool = False
    lora_bias: bool = False

    def validate(self) -> None:
        """minilora's checks, then PEFT's task types, then "no PEFT feature minilora lacks is used"."""
        super().validate()
        if not isinstance(self.inference_mode, bool):
            raise MiniLoraError(f"inference_mode must be True or False (a bool), got {self.inference_mode!r}.")
        for name in ("base_model_name_or_path", "revision"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise MiniLoraError(f"{name} must be None or a string, got {getattr(self, name)!r}.")
        if self.task_type is not None and self.task_type not in TaskType.__members__:
            raise MiniLoraError(f"task_type={self.task_type!r} is not one of PEFT's task types: "
                                f"{list(TaskType.__members__)}.")
        if self.task_type is not None:
            self.task_type = TaskType(self.task_type)
        check_unsupported(vars(self), "LoraConfig")


_dataclass_init = LoraConfig.__init__


@functools.wraps(_dataclass_init)
def _init_naming_unknown_fields(self, *args: Any, **kwargs: Any) -> None:
    """The dataclass __init__, after naming any field it does not know (a newer PEFT's, or a typo)
    in a MiniLoraError instead of Python's bare TypeError."""
    known = {f.name for f in dataclasses.fields(LoraConfig)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise MiniLoraError(f"LoraConfig got fields minilora does not know: {unknown}. They are probably from a newer "
                            "PEFT (or misspelt); minilora cannot honour them, so it stops rather than train something "
                            f"else. Its fields: {sorted(known)}.")
    _dataclass_init(self, *args, **kwargs)


LoraConfig.__init__ = _init_naming_unknown_fields


def get_peft_model(model: nn.Module, peft_config: LoraConfig, adapter_name: str = "default",
                   autocast_adapter_dtype: bool = True) -> nn.Module:
    """Inject LoRA into ``model`` in place and give it PEFT's methods; returns the same object.

    Same seed, same adapter as ``peft.get_peft_model`` (minilora draws A and B in PEFT's order).
    Calling it again on the result raises MiniLoraError: the model already has LoRA layers (add
    more adapters with ``model.add_adapter(name, config)``).

    Args:
        adapter_name: the name of the first adapter ("default" in PEFT's files).
        autocast_adapter_dtype: only True, PEFT's default (float16 / bfloat16 adapters are kept in float32).
    """
    if not isinstance(peft_config, _MiniLoraConfig):
        raise MiniLoraError(f"get_peft_model needs minilora.compat.LoraConfig, got "
                            f"{type(peft_config).__module__}.{type(peft_config).__qualname__}. "
                            "Import LoraConfig from minilora.compat as well.")
    if autocast_adapter_dtype is not True:
        raise MiniLoraError("minilora always keeps float16 / bfloat16 adapters in float32 (PEFT's "
                            "autocast_adapter_dtype=True).")
    add_task_head(model, peft_config)
    inject(model, peft_config, adapter_name)
    leave_new_layers_in_train_mode(model, adapter_name)
    if getattr(peft_config, "inference_mode", False):
        for param in model.parameters():
            param.requires_grad_(False)
    _add_peft_methods(model)
    return model


# The heads PEFT's task models (PeftModelForSequenceClassification, ...ForTokenClassification,
# ...ForQuestionAnswering in peft/peft_model.py) add to modules_to_save: a new head is random, so it
# must train in full and be saved with the adapter.
TASK_HEADS = {"SEQ_CLS": ["classifier", "score"], "TOKEN_CLS": ["classifier", "score"],
              "QUESTION_ANS": ["qa_outputs"]}


def add_task_head(model: nn.Module, config: LoraConfig) -> None:
    """As PEFT does for SEQ_CLS, TOKEN_CLS and QUESTION_ANS: append the task's head names to the
    config's ``modules_to_save`` (in place, as PEFT changes its config).

    Raises:
        MiniLoraError: when the model has no module of those names (e.g. T5ForSequenceClassification's
            ``classification_head``) and ``modules_to_save`` names none either: PEFT then leaves the
            random head frozen and unsaved, without a word.
    """
    task = getattr(getattr(config, "task_type", None), "value", getattr(config, "task_type", None))
    heads = TASK_HEADS.get(task)
    if heads is None:
        return
    names = [name for name, _ in model.named_modules(remove_duplicate=False)]
    wanted = (config.modules_to_save or []) + heads
    if not any(name.endswith(head) for name in names for head in wanted):
        raise MiniLoraError(
            f"task_type={task}: PEFT trains and saves the task head by the names {heads}, but this "
            f"{type(model).__name__} has no module of those names, so PEFT would leave its random head frozen and "
            f"unsaved. Name the head: LoraConfig(..., modules_to_save=[...]) with one of "
            f"{[name for name, _ in model.named_children()]}."
        )
    config.modules_to_save = wanted


class PeftModel:
    """Only ``PeftModel.from_pretrained``: there are no wrapper objects in minilora."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise MiniLoraError("minilora has no PeftModel objects: use get_peft_model(model, config) or "
                            "PeftModel.from_pretrained(model, directory); both return the model itself.")

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, **kwargs: Any) -> nn.Module:
        """Load the adapter ``model_id`` (a directory saved by minilora or PEFT, or a Hugging Face hub id,
        with PEFT's ``subfolder=`` and ``revision=``) into ``model``; returns it.

        A base model is injected; a model that already has matching LoRA layers (e.g. from
        ``get_peft_model``) gets the trained weights in those layers. As in PEFT, ``is_trainable=False``
        freezes the adapter and puts the model in eval mode.
        """
        adapters.reject_whole_module(model_id, "PeftModel.from_pretrained")
        directory = resolve_adapter_source(model_id, kwargs, "PeftModel.from_pretrained")
        had_layers = any(True for _ in lora_layers(model))
        adapters.load_adapter(model, directory, is_trainable=is_trainable, adapter_name=adapter_name)
        if had_layers:
            draw_like_peft_rewrap(model, adapter_name, directory)
        else:
            leave_new_layers_in_train_mode(model, adapter_name)
        if not is_trainable:
            model.eval()
        _add_peft_methods(model)
        return model


# --------------------------------------------------------------------------------------------
# PEFT's methods, set on the model object itself
# --------------------------------------------------------------------------------------------
def _print_trainable_parameters(model: nn.Module) -> None:
    """``trainable params: ... || all params: ... || trainable%: ...``, PEFT's line, same numbers."""
    print_trainable_parameters(model)


def _get_nb_trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts, as PEFT's ``get_nb_trainable_parameters``."""
    trainable, total = count_parameters(model)
    return trainable, total


def _merge_and_unload(model: nn.Module, progressbar: bool = False, safe_merge: bool = False) -> nn.Module:
    """Fold dW into W0, put the plain layers back and drop PEFT's methods: a plain model again."""
    merge_and_unload(model, safe=safe_merge)
    _remove_peft_methods(model)
    return model


def _unload(model: nn.Module) -> nn.Module:
    """Put the plain layers back without merging and drop PEFT's methods: the base model again."""
    unload(model)
    _remove_peft_methods(model)
    return model


def _get_base_model(model: nn.Module) -> nn.Module:
    """There is no wrapper: the base model is the model itself."""
    return model


def _load_state_dict(model: nn.Module, state_dict: Any, *args: Any, **kwargs: Any) -> Any:
    """PyTorch's ``load_state_dict``, after catching pitfall 2 (a whole model passed as a state dict)."""
    adapters.reject_whole_module(state_dict, "load_state_dict")
    return type(model).load_state_dict(model, state_dict, *args, **kwargs)


PEFT_METHODS = {
    "print_trainable_parameters": _print_trainable_parameters,
    "get_nb_trainable_parameters": _get_nb_trainable_parameters,
    "merge_and_unload": _merge_and_unload,
    "unload": _unload,
    "get_base_model": _get_base_model,
    "load_state_dict": _load_state_dict,
    **MULTI_ADAPTER_METHODS,  # save_pretrained, disable_adapter, add_adapter, set_adapter, ... (compat_adapters.py)
}


def _add_peft_methods(model: nn.Module) -> None:
    """Set each of PEFT_METHODS on this one object (not its class), bound to it.

    ``functools.partial`` rather than a bound method: it survives ``copy.deepcopy`` and
    ``torch.save(model)`` pointing at the copy, where a pickled bound method would come back as
    the class's own ``save_pretrained``.
    """
    for name, function in PEFT_METHODS.items():
        object.__setattr__(model, name, functools.update_wrapper(functools.partial(function, model), function))
    sync_attributes(model)  # peft_config, active_adapter, active_adapters
    accept_adapter_names(model)  # model(..., adapter_names=[...]): a mixed batch (mixed.py)
    if callable(getattr(type(model), "generate", None)):  # and model.generate(..., adapter_names=[...])
        object.__setattr__(model, "generate", functools.partial(generate_with_adapter_names, model))


def _remove_peft_methods(model: nn.Module) -> None:
    for name in (*PEFT_METHODS, *ATTRIBUTES, "generate"):
        model.__dict__.pop(name, None)
    refuse_adapter_names(model)


# --------------------------------------------------------------------------------------------
# PEFT's side effects that a script's later numbers depend on
# --------------------------------------------------------------------------------------------
def leave_new_layers_in_train_mode(model: nn.Module, adapter_name: str) -> None:
    """PEFT's new LoRA modules start in train mode even inside an eval() model (dropout on until the
    next .eval()); minilora's own inject follows the model's mode instead (the safer choice,
    README "Train and eval mode"). compat does what PEFT does, so a script that never calls
    .train() / .eval() draws the same dropout masks, and prints the same numbers, as with PEFT."""
    for _, layer in lora_layers(model):
        if adapter_name in layer.lora_A:
            base_mode = layer.base_layer.training
            layer.train(True)
            layer.base_layer.train(base_mode)


def draw_like_peft_rewrap(model: nn.Module, adapter_name: str, directory: Path) -> None:
    """``PeftModel.from_pretrained`` on a model that has its LoRA layers already (pitfall 1) makes
    PEFT wrap it again: each layer's adapter is rebuilt, drawing A and B from the default random
    generator, before the files are read. minilora loads into the layers instead, and draws the
    same numbers here, so that every random number the script draws afterwards is PEFT's."""
    config = read_adapter_config(directory)
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


__all__ = ["LoraConfig", "PeftModel", "TaskType", "get_peft_model"]
