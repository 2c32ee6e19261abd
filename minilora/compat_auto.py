"""PEFT's ``AutoPeftModel`` classes: load the base model an adapter was trained on, then the adapter.

    from minilora.compat import AutoPeftModelForCausalLM

    model = AutoPeftModelForCausalLM.from_pretrained("my-adapter")   # base from adapter_config.json

As in PEFT: the adapter's ``base_model_name_or_path`` (and ``revision``) is loaded with the
transformers class of the task (``AutoModelForCausalLM`` for ``AutoPeftModelForCausalLM``, or, for
``AutoPeftModel`` and an adapter without a task type, the class its ``auto_mapping`` names, from an
allowed library only); a tokenizer saved next to the adapter with more tokens than the base model's
embedding grows the embedding first; then ``PeftModel.from_pretrained`` (the task's wrapper) loads
the adapter. Keyword arguments go to transformers' ``from_pretrained`` (``dtype=``, ...) as PEFT
passes them; the hub options (``subfolder=``, ...) also find the adapter, and ``device_map`` /
``torch_device`` also go to ``PeftModel.from_pretrained``.
"""

from __future__ import annotations

import importlib
import os
import warnings
from typing import Any, Optional

from torch import nn

from . import adapters
from .adapter_config import CONFIG_NAME, config_from_fields
from .adapter_files import read_saved_config_fields
from .compat import PeftModel
from .compat_config import LoraConfig
from .compat_loading import HUB_OPTIONS, resolve_adapter_source
from .compat_tasks import (TASK_MODELS, PeftModelForCausalLM, PeftModelForFeatureExtraction,
                           PeftModelForQuestionAnswering, PeftModelForSeq2SeqLM, PeftModelForSequenceClassification,
                           PeftModelForTokenClassification)
from .config import MiniLoraError

IMPORT_ALLOWLIST = ["diffusers", "lerobot", "megatron-core", "transformers"]  # PEFT's get_default_import_allowlist()
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"


class _BaseAutoPeftModel:
    """``from_pretrained`` only: the transformers class to load the base with, and the wrapper to build."""

    _target_class: Optional[str] = None  # a name in transformers (imported when used)
    _target_peft_class: type[PeftModel] = PeftModel

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise MiniLoraError(f"{type(self).__name__} is built with {type(self).__name__}.from_pretrained(directory).")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, config: Optional[LoraConfig] = None,
                        revision: Optional[str] = None, import_allowlist: Optional[list[str]] = None,
                        **kwargs: Any) -> PeftModel:
        """The base model of the adapter ``pretrained_model_name_or_path`` (a directory or a hub id) with
        the adapter loaded: PEFT's ``AutoPeftModel...from_pretrained``.

        Raises:
            MiniLoraError: when the adapter names no base model, its task type is another class's, or
                its ``auto_mapping`` names a library outside ``import_allowlist``.
        """
        hub = {name: kwargs[name] for name in HUB_OPTIONS if name in kwargs}
        directory = resolve_adapter_source(pretrained_model_name_or_path, {**hub, "revision": revision}, cls.__name__)
        fields, origin = read_saved_config_fields(adapters._adapter_directory(directory))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (from_pretrained below warns about the file's fields)
            config_from_fields(fields, origin)  # (every field checked before a base model is loaded)
        base_path, task = fields.get("base_model_name_or_path"), fields.get("task_type")
        if not base_path:
            raise MiniLoraError(f"{directory / CONFIG_NAME} names no base_model_name_or_path, so there is no base "
                                "model to load: load it yourself, then PeftModel.from_pretrained(base, directory).")
        target_class = cls._base_class(task, fields.get("auto_mapping"), import_allowlist or IMPORT_ALLOWLIST)
        model_kwargs = {name: value for name, value in kwargs.items() if name != "torch_device"}  # (all, as PEFT)
        try:
            base_model = target_class.from_pretrained(base_path, revision=fields.get("revision"), **model_kwargs)
        except (OSError, ValueError) as error:  # (transformers' errors for a path or id it cannot load)
            raise MiniLoraError(f"{origin}: the base model it names, {base_path!r}, could not be loaded "
                                f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). "
                                "Load the base model yourself, then PeftModel.from_pretrained(base, directory).") \
                from None
        _grow_embedding_for_tokenizer(base_model, directory)
        options = {name: value for name, value in kwargs.items() if name in ("torch_device", "device_map")}
        return cls._target_peft_class.from_pretrained(base_model, directory, adapter_name=adapter_name,
                                                      is_trainable=is_trainable, config=config, **options)

    @classmethod
    def _base_class(cls, task: Optional[str], auto_mapping: Any, allowlist: list[str]) -> type:
        """The class that loads the base model, chosen as PEFT chooses it."""
        import transformers

        if cls._target_class is not None:
            expected = TASK_MODELS.get(task)
            if task is not None and expected is not cls._target_peft_class:
                raise MiniLoraError(f"Expected target PEFT class: {getattr(expected, '__name__', None)}, but you have "
                                    f"asked for: {cls._target_peft_class.__name__} make sure that you are loading the "
                                    "correct model for your task type.")
            return getattr(transformers, cls._target_class)
        if task is not None:
            raise MiniLoraError("Cannot use `AutoPeftModel` with a task type, please use a specific class for your task "
                                f"type. (e.g. `AutoPeftModelForCausalLM` for `task_type='CAUSAL_LM'`); this one is "
                                f"{task!r}.")
        if not isinstance(auto_mapping, dict) or not {"base_model_class", "parent_library"} <= set(auto_mapping):
            raise MiniLoraError("Cannot infer the auto class from the config, please make sure that you are loading "
                                "the correct model for your task type.")
        library, name = auto_mapping["parent_library"], auto_mapping["base_model_class"]
        if not isinstance(library, str) or not isinstance(name, str):
            raise MiniLoraError(f"auto_mapping must name a library and a class (two strings), got {auto_mapping!r}.")
        if not any(library == allowed or library.startswith(f"{allowed}.") for allowed in allowlist):
            raise MiniLoraError(f"The auto mapping wants to import '{library}' which is not in the import allowlist. If "
                                f"you are sure that importing this library is safe, specify "
                                f"`import_allowlist=['{library}']` in `from_pretrained()`.")
        try:
            found = getattr(importlib.import_module(library), name, None)
        except ImportError as error:
            raise MiniLoraError(f"auto_mapping names the library {library!r}, which cannot be imported ({error}).") \
                from None
        if not (isinstance(found, type) and hasattr(found, "from_pretrained")):
            raise MiniLoraError(f"auto_mapping names {library}.{name}, which is not a model class with from_pretrained. "
                                "Load the base model yourself, then PeftModel.from_pretrained(base, directory).")
        return found


def _grow_embedding_for_tokenizer(model: nn.Module, directory: os.PathLike) -> None:
    """As PEFT: a tokenizer saved with the adapter that has more tokens than the model's input
    embedding has rows grows the embedding (``resize_token_embeddings``) before the adapter loads."""
    if not os.path.exists(os.path.join(directory, TOKENIZER_CONFIG_NAME)) or not hasattr(model, "get_input_embeddings"):
        return
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))


class AutoPeftModel(_BaseAutoPeftModel):
    """An adapter without a task type: the base class from its ``auto_mapping``."""


class AutoPeftModelForCausalLM(_BaseAutoPeftModel):
    _target_class, _target_peft_class = "AutoModelForCausalLM", PeftModelForCausalLM


class AutoPeftModelForSeq2SeqLM(_BaseAutoPeftModel):
    _target_class, _target_peft_class = "AutoModelForSeq2SeqLM", PeftModelForSeq2SeqLM


class AutoPeftModelForSequenceClassification(_BaseAutoPeftModel):
    _target_class, _target_peft_class = "AutoModelForSequenceClassification", PeftModelForSequenceClassification


class AutoPeftModelForTokenClassification(_BaseAutoPeftModel):
    _target_class, _target_peft_class = "AutoModelForTokenClassification", PeftModelForTokenClassification


class AutoPeftModelForQuestionAnswering(_BaseAutoPeftModel):
    _target_class, _target_peft_class = "AutoModelForQuestionAnswering", PeftModelForQuestionAnswering


class AutoPeftModelForFeatureExtraction(_BaseAutoPeftModel):
    _target_class, _target_peft_class = "AutoModel", PeftModelForFeatureExtraction
