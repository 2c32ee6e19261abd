"""PEFT's API as a drop-in: code written for PEFT runs on minilora with one changed import.

    from minilora.compat import get_peft_model, LoraConfig, TaskType, PeftModel

    config = LoraConfig(task_type=TaskType.CAUSAL_LM, inference_mode=False, r=8, lora_alpha=32, lora_dropout=0.1)
    model = get_peft_model(model, config)
    model.print_trainable_parameters()   # trainable params: 294,912 || all params: 124,734,720 || trainable%: 0.2364
    ...                                  # train, e.g. with transformers.Trainer
    model.save_pretrained("out")         # adapter_config.json + adapter_model.safetensors, PEFT's format
    model = PeftModel.from_pretrained(base_model, "out")
    model = model.merge_and_unload()

**The wrapper.** As in PEFT, ``get_peft_model`` injects LoRA into your model in place (with
``minilora.inject``) and returns a ``PeftModel`` around it:

    peft_model                      PeftModel (or PeftModelForCausalLM, ... by task_type): PEFT's methods
    peft_model.base_model           LoraModel (compat_adapters.py): PEFT's model-wide adapter methods
    peft_model.base_model.model     your model, with LoraLinear layers in it

Why a wrapper, when minilora's own API has none: PEFT's scripts and tests reach through it
(``model.base_model.model.<layer>``, ``model.get_base_model()``, ``isinstance(model, PeftModel)``),
and its state-dict keys (``base_model.model.<layer>.lora_A.default.weight``) are what checkpoints
of PEFT models hold. Attributes the wrapper does not have are looked up on ``base_model``, then on
your model, as in PEFT, so ``peft_model.config`` and ``peft_model.generate`` work. The native API
(``minilora.inject``) stays wrapper-free.

Also here, from their own files: ``LoraConfig`` and ``TaskType`` (compat_config.py), the task
wrappers ``PeftModelForCausalLM``, ... (compat_tasks.py), PEFT's state-dict functions
(``get_peft_model_state_dict``, ``inject_adapter_in_model``, ...; compat_state_dict.py) and the
``AutoPeftModel`` classes (compat_auto.py); what loading checks and does around ``from_pretrained``
is in compat_loading.py. ``transformers.Trainer``
handles the wrapper as it handles PEFT's (adapter-only checkpoints, resume, best-model reload,
eval_loss without a task_type): compat_trainer.py.

**Better than PEFT, kept.** PEFT's two classic pitfalls:

1. ``get_peft_model(model, config)`` followed by ``PeftModel.from_pretrained(that_model, directory)``:
   PEFT wraps the model a second time and gives the base model's outputs (with a "missing adapter
   keys" warning in recent releases). Here ``from_pretrained`` finds the LoRA layers already in the
   model, loads the trained A and B into them and returns the same wrapper: the trained outputs.
2. ``torch.save(model)`` (the whole model object) mixed up with loading weights: every loading
   function here, and ``peft_model.load_state_dict``, raises a MiniLoraError that explains the two
   consistent save/load pairs.

**PEFT's random numbers.** Every call here draws from torch's default generator exactly what the
PEFT call it replaces draws (pitfall 1 included: PEFT's second wrap draws a fresh init, and so does
minilora, before loading), so a script's later random numbers do not depend on the import.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import os
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from . import adapters, multi
from .adapter_config import config_from_fields
from .compat_adapters import LoraModel, write_model_card
from .compat_config import LoraConfig, TaskType, check_config, resolved_targets
from .compat_loading import (adapter_on_meta, after_pefts_injection, check_flag, check_given_config,
                             check_load_options, check_task_head_saved, drawing_nothing, draw_like_peft_rewrap,
                             freeze_for_inference, keep_pefts_config, keep_the_layout_injection_set,
                             leave_new_layers_in_train_mode, load_into_existing_adapter, lora_layer_ids,
                             pefts_config, read_files, refuse_base_weights_into_merged_layers,
                             resolve_adapter_source, train_new_lora_biases_if_bias_all, unmerge_as_pefts_injection,
                             upcast_adapter)
from .compat_state_dict import (get_base_model_state_dict, get_peft_model_state_dict, inject_adapter_in_model,
                                set_base_model_state_dict, set_peft_model_state_dict)
from .compat_trainer import recognise_compat_models
from .compat_tying import check_saved_tying, check_tied_modules
from .config import MiniLoraError
from .inject import adapter_configs, inject, lora_layers, set_adapter_config
from .mixed import mixed_batch
from .params import count_parameters, trainable_parameters_line
from .saved_modules import ModulesToSave as ModulesToSaveWrapper  # PEFT's name, for isinstance checks
from .saved_modules import is_saved_module_key, saved_modules
# TASK_MODELS, add_task_head and check_head_not_targeted are imported from compat_tasks.py inside the functions that
# use them: that file subclasses PeftModel, so it imports this one (see __getattr__ at the end).


def get_peft_model(model: nn.Module, peft_config: LoraConfig, adapter_name: str = "default", mixed: bool = False,
                   autocast_adapter_dtype: bool = True, revision: Optional[str] = None,
                   low_cpu_mem_usage: bool = False) -> "PeftModel":
    """Inject LoRA into ``model`` in place and wrap it: a ``PeftModel``, or the task's subclass
    (``PeftModelForCausalLM``, ...) chosen by ``peft_config.task_type``, as PEFT's.

    Same seed, same adapter as ``peft.get_peft_model`` (minilora draws A and B in PEFT's order).
    Calling it again on a model with LoRA layers raises MiniLoraError (PEFT warns and stacks a second
    wrapper; add more adapters with ``peft_model.add_adapter(name, config)``).

    Args:
        adapter_name: the name of the first adapter ("default" in PEFT's files).
        mixed: PEFT's mixed adapter types (LoRA with LoHa, ...): not in minilora, only False.
        autocast_adapter_dtype: True (PEFT's default) keeps float16 / bfloat16 adapters in float32.
        revision: recorded in the config as the base model's revision, as PEFT does.
        low_cpu_mem_usage: as in PEFT, A and B are placeholders on the meta device (no memory, nothing
            drawn from your seed) until ``set_peft_model_state_dict`` loads them; a forward before that is a
            MiniLoraError (PEFT's gives meaningless numbers).
    """
    check_config(peft_config, "get_peft_model")
    if mixed is not False:
        raise MiniLoraError("get_peft_model(mixed=True) builds PEFT's PeftMixedModel (LoRA mixed with LoHa, LoKr, "
                            "...); minilora has LoRA only. Leave mixed=False.")
    # As PEFT's get_peft_model: the config records the model's own name (transformers' name_or_path), with a
    # warning if that replaces a name the config had.
    old_name, new_name = peft_config.base_model_name_or_path, model.__dict__.get("name_or_path", None) or None
    peft_config.base_model_name_or_path = new_name
    if old_name is not None and old_name != new_name:
        warnings.warn(f"The PEFT config's `base_model_name_or_path` was renamed from '{old_name}' to '{new_name}'. "
                      "Please ensure that the correct base model is loaded when loading this checkpoint.", stacklevel=2)
    if revision is not None:
        if peft_config.revision is not None and peft_config.revision != revision:
            warnings.warn(f"peft config has already set base model revision to {peft_config.revision}, overwriting "
                          f"with revision {revision}", stacklevel=2)
        peft_config.revision = revision
    from .compat_tasks import TASK_MODELS

    task = _task(peft_config)
    peft_model = TASK_MODELS.get(task, PeftModel)(model, peft_config, adapter_name,
                                                  autocast_adapter_dtype=autocast_adapter_dtype,
                                                  low_cpu_mem_usage=low_cpu_mem_usage)
    if low_cpu_mem_usage:
        adapter_on_meta(model, adapter_name)
    return peft_model


def _task(config: Any) -> Optional[str]:
    """The config's task type as a string (TaskType members are strings too)."""
    task = getattr(config, "task_type", None)
    return getattr(task, "value", task)


class PeftModel(nn.Module):
    """PEFT's ``PeftModel``: your model with LoRA injected, as ``self.base_model.model``.

    ``PeftModel(model, config)`` injects, as ``get_peft_model`` does (which also picks the task's
    subclass); ``PeftModel.from_pretrained(model, directory)`` loads a saved adapter. Methods and
    arguments are PEFT's; ``__getattr__`` falls back to ``base_model`` (LoraModel), then to your model.
    """

    TASK_HEADS: list[str] = []  # the heads a task subclass trains in full (modules_to_save)
    HEAD_AFTER_INJECTION = False  # PEFT adds the TASK_HEADS to modules_to_save only after injecting (TOKEN_CLS, QA)
    GENERATES = False  # the task subclass keeps the model's prepare_inputs_for_generation (CAUSAL_LM, SEQ_2_SEQ_LM)
    _is_prompt_learning = False  # minilora has LoRA only: no prompt tuning
    special_peft_forward_args = frozenset({"adapter_names", "alora_offsets"})

    def __init__(self, model: nn.Module, peft_config: LoraConfig, adapter_name: str = "default",
                 autocast_adapter_dtype: bool = True, low_cpu_mem_usage: bool = False) -> None:
        super().__init__()
        check_config(peft_config, type(self).__name__)
        check_flag("autocast_adapter_dtype", autocast_adapter_dtype)
        check_flag("low_cpu_mem_usage", low_cpu_mem_usage)
        if isinstance(model, PeftModel):
            raise MiniLoraError(f"{type(self).__name__} got a PeftModel; wrapping it again would stack adapters. Add "
                                "another adapter with peft_model.add_adapter(name, config) instead.")
        self._check_task_fits(model)
        if self.TASK_HEADS:
            from .compat_tasks import add_task_head, check_head_not_targeted

            if self.HEAD_AFTER_INJECTION:
                check_head_not_targeted(model, peft_config, self.TASK_HEADS, type(self).__name__)
            add_task_head(model, peft_config, self.TASK_HEADS, _task(peft_config) or type(self).__name__)
        check_tied_modules(model, peft_config)
        resolved = resolved_targets(model, peft_config)
        with drawing_nothing(low_cpu_mem_usage):
            inject(model, peft_config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
        peft_config.target_modules = resolved
        leave_new_layers_in_train_mode(model, adapter_name)
        if getattr(peft_config, "inference_mode", False):
            freeze_for_inference(model, peft_config.bias)
        self._hold(model)
        self.__dict__["_active_name"] = adapter_name

    def _hold(self, model: nn.Module) -> None:
        """Wrap ``model`` (injected already) and do what PEFT's constructor does to it besides injecting."""
        recognise_compat_models(PeftModel, self)  # transformers.Trainer handles it as a PEFT model (compat_trainer.py)
        self.base_model = LoraModel(model)
        self._show_model_signature(model)
        checkpointing = getattr(type(model), "is_activation_checkpointing", None)  # (transformers 5's new name)
        if getattr(model, "is_activation_checkpointing" if checkpointing else "is_gradient_checkpointing", True):
            _inputs_require_grad(model)  # (PEFT's default, True, when the model does not say)
        if hasattr(getattr(model, "config", None), "pretraining_tp"):
            model.config.pretraining_tp = 1  # PEFT switches Llama's simulated tensor parallelism off

    def _show_model_signature(self, model: nn.Module) -> None:
        """transformers.Trainer keeps only the batch columns that the forward's signature names; for
        PEFT's wrappers it reads your model's signature. This wrapper's forward (an instance attribute,
        so that copies and pickles call their own) shows your model's signature for the same result."""
        forward = functools.partial(type(self).forward, self)
        try:
            forward.__signature__ = inspect.signature(model.forward)
        except (TypeError, ValueError):  # a forward without an introspectable signature: keep ours
            return
        self.__dict__["forward"] = forward

    @classmethod
    def _check_task_fits(cls, model: nn.Module) -> None:
        """PEFT's ``PeftModelForCausalLM`` and ``...ForSeq2SeqLM`` read the model's
        ``prepare_inputs_for_generation``, and fail (an AttributeError, after injecting) on a model that
        cannot generate, such as a classifier given task_type CAUSAL_LM: refused here, before anything changes."""
        if cls.GENERATES and not hasattr(model, "prepare_inputs_for_generation"):
            raise MiniLoraError(f"{cls.__name__} is for models that generate text, and this {type(model).__name__} "
                                "has no prepare_inputs_for_generation (PEFT fails on it with an AttributeError). "
                                "Use the task_type of the model's head (SEQ_CLS, TOKEN_CLS, QUESTION_ANS, "
                                "FEATURE_EXTRACTION) or task_type=None.")

    @classmethod
    def _wrapping(cls, model: nn.Module) -> "PeftModel":
        """A wrapper around a model that has its LoRA layers already (loaded, or injected natively)."""
        wrapper = cls.__new__(cls)
        nn.Module.__init__(wrapper)
        wrapper._hold(model)
        return wrapper

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)  # parameters, buffers and submodules (base_model)
        except AttributeError:
            if name == "base_model":  # not built yet (e.g. while unpickling): no recursion
                raise
            return getattr(self.base_model, name)

    # ----------------------------------------------------------------------------------------
    # What the wrapper holds
    # ----------------------------------------------------------------------------------------
    def get_base_model(self) -> nn.Module:
        """Your model (with the LoRA layers in it)."""
        return self.base_model.model

    @property
    def peft_config(self) -> dict:
        """{adapter name: its LoraConfig}."""
        return self.base_model.peft_config

    @property
    def active_adapters(self) -> list[str]:
        return self.base_model.active_adapters

    @property
    def active_adapter(self) -> str | list[str]:
        """The name PEFT's PeftModel keeps as its active adapter: set when it is made (get_peft_model,
        from_pretrained), by its set_adapter, and by a delete_adapter that leaves one adapter active.
        ``base_model.set_adapter`` (LoraModel's; a list makes several active) leaves it as it was, as in
        PEFT, so after ``base_model.set_adapter(["a", "b"])`` it still names one adapter;
        ``active_adapters`` says which run."""
        name = self.__dict__.get("_active_name")
        return self.base_model.active_adapter if name is None else name

    @property
    def active_peft_config(self) -> LoraConfig:
        return self.peft_config[self.active_adapter]

    @property
    def peft_type(self) -> Any:
        return getattr(self.active_peft_config, "peft_type", "LORA")

    @property
    def modules_to_save(self) -> Optional[set[str]]:
        """Every config's modules_to_save, together (None when there are none), as PEFT's."""
        names = {name for config in self.peft_config.values() for name in (config.modules_to_save or [])}
        return names or None

    @property
    def has_active_enabled_adapter(self) -> bool:
        """PEFT's: False only inside ``with model.disable_adapter():`` while some adapter is active (True
        after ``base_model.disable_adapter_layers()``, and inside the block when none is active). forward reads it:
        when True, ``adapter_names`` are checked (eval mode, names that exist) even if the layers are disabled."""
        self._check_kept_name("has_active_enabled_adapter")
        return not self.__dict__.get("_adapters_disabled", False) or not self.active_adapters

    @property
    def base_model_torch_dtype(self) -> Optional[torch.dtype]:
        return getattr(self.base_model, "dtype", None)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts, as PEFT's ``get_nb_trainable_parameters``."""
        trainable, total = count_parameters(self)
        return trainable, total

    def print_trainable_parameters(self) -> None:
        """``trainable params: ... || all params: ... || trainable%: ...``, PEFT's line, same numbers."""
        print(trainable_parameters_line(self))

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """PEFT's question before ``peft.convert_to_lora`` (an adapter re-fitted as a LoRA of another rank by
        SVD): that conversion is not part of minilora, so this refuses rather than answer for it."""
        raise MiniLoraError("supports_lora_conversion / convert_to_lora (PEFT's LoRA conversion: an adapter re-fitted "
                            "as a LoRA of another rank) is not part of minilora. To change the rank of a LoRA adapter, "
                            "use add_weighted_adapter with combination_type='svd' and svd_rank.")

    def prepare_model_for_gradient_checkpointing(self, model: nn.Module) -> None:
        """PEFT's: make ``model``'s input embeddings' output require grad (what the constructor does when the
        model checkpoints already), so that gradient checkpointing turned on later still reaches the adapters."""
        _inputs_require_grad(model)

    def get_layer_status(self) -> list:
        """The state of each LoRA layer, with PEFT's names: module type "lora.Linear", and each layer's
        name as PEFT's LoraModel sees it (under ``model.``)."""
        return multi.layer_status(self.base_model, module_type="lora.Linear")

    def get_model_status(self):
        """What PEFT's ``get_model_status`` reports for this model (adapter_model_type "LoraModel")."""
        model = self.get_base_model()
        status = multi.model_status(model, self.get_layer_status(), adapter_model_type="LoraModel")
        return dataclasses.replace(status, base_model_type=type(model).__name__)

    # ----------------------------------------------------------------------------------------
    # Forward, with PEFT's mixed batches
    # ----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _peft_forward_args(self, kwargs: dict, encoder_adapter_names: list[str] | None = None) -> Iterator[None]:
        """Take PEFT's own arguments out of ``kwargs``; ``adapter_names=[...]`` runs a mixed batch
        (one adapter per row, "__base__" for none; mixed.py) while the adapters are enabled."""
        deleted = self.__dict__.get("_deleted_active")
        if deleted is not None:
            why = ("PEFT picks the next one in the first LoRA layer, which held no other" if self.peft_config
                   else "it was the last adapter")
            raise MiniLoraError(f"delete_adapter({deleted!r}) deleted the active adapter and left none active ({why}), "
                                f"so PEFT's forward fails here (a KeyError: {deleted!r}). {self._set_another_hint()}")
        self._check_kept_name("forward")
        adapter_names = kwargs.pop("adapter_names", None)
        if kwargs.pop("alora_offsets", None) is not None:
            raise MiniLoraError("alora_offsets are for PEFT's activated LoRA (alora_invocation_tokens), which "
                                "minilora does not have.")
        if adapter_names is None or not self.has_active_enabled_adapter:
            yield
            return
        if self.base_model.training:
            raise MiniLoraError("Cannot pass `adapter_names` when the model is in training mode: call model.eval() "
                                "first.")
        with mixed_batch(self.get_base_model(), adapter_names, encoder_adapter_names):
            yield

    def _check_kept_name(self, what: str) -> None:
        """PEFT's PeftModel reads the config of the adapter it keeps as active (``active_adapter``) in forward,
        generate, save_pretrained, disable_adapter, set_requires_grad and has_active_enabled_adapter: after
        delete_adapter of that adapter, while several others stay active (made so by
        base_model.set_adapter([...])) or none, the name is gone and PEFT fails with a KeyError."""
        kept = self.__dict__.get("_active_name")
        if isinstance(kept, str) and kept not in self.peft_config:
            active = f"while {self.active_adapters} stay active" if self.active_adapters else "and none is active"
            raise MiniLoraError(f"delete_adapter({kept!r}) deleted the adapter this PeftModel keeps as its active one "
                                f"{active}, so PEFT's {what} fails here (a KeyError: {kept!r}). "
                                f"{self._set_another_hint()}")

    def _set_another_hint(self) -> str:
        """What to do once the active adapter was deleted (the end of both refusals above)."""
        return (f"Call set_adapter with one of {list(self.peft_config)} first." if self.peft_config else
                "No adapter is left: run model.get_base_model(), or add an adapter and set_adapter it.")

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self._peft_forward_args(kwargs):
            return self.get_base_model()(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """Your model's ``generate``; with ``adapter_names=[...]`` every step runs the mixed batch (with
        beam search each row's name is repeated once per beam, as PEFT does, except in an encoder-decoder's
        encoder, which sees each input once)."""
        beams, names = kwargs.get("num_beams"), kwargs.get("adapter_names")
        encoder_names = None
        if isinstance(names, (list, tuple)) and isinstance(beams, int) and beams > 1:
            kwargs["adapter_names"], encoder_names = [name for name in names for _ in range(beams)], list(names)
        with self._peft_forward_args(kwargs, encoder_names):
            return self.get_base_model().generate(*args, **kwargs)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """``with model.disable_adapter():`` the base model's outputs inside the block, as PEFT's.

        PEFT's details, kept: a merged layer is unmerged on the fly by its forward (so the block gives
        the base outputs and the model is unmerged afterwards); leaving the block enables every layer
        and makes the active adapters require grad, and it warns first if some layers were enabled
        and some not.
        """
        self._check_kept_name("disable_adapter")
        status, was_disabled = self.get_model_status(), self.__dict__.get("_adapters_disabled", False)
        if status.enabled == "irregular":
            warnings.warn("The model contains some adapter layers that are enabled and others that are disabled. "
                          "This is most likely unintentional. After exiting the disable_adapter context, all "
                          "adapters will be enabled", stacklevel=3)
        try:
            self.base_model.disable_adapter_layers()
            self.__dict__["_adapters_disabled"] = True  # (PEFT's flag: has_active_enabled_adapter reads it)
            yield
        finally:
            if status.enabled is not False:
                self.base_model.enable_adapter_layers()
            self.__dict__["_adapters_disabled"] = was_disabled

    # ----------------------------------------------------------------------------------------
    # Several adapters
    # ----------------------------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, peft_config: LoraConfig, low_cpu_mem_usage: bool = False,
                    autocast_adapter_dtype: bool = True) -> None:
        """A new adapter, inactive and frozen until ``set_adapter`` (same seed, same weights as PEFT); with
        ``low_cpu_mem_usage``, as PEFT, its A and B are meta-device placeholders until loaded."""
        check_config(peft_config, "add_adapter")
        check_flag("low_cpu_mem_usage", low_cpu_mem_usage)
        if adapter_name in self.peft_config:
            raise MiniLoraError(f"Adapter with name '{adapter_name}' already exists.")
        model = self.get_base_model()
        if self.TASK_HEADS:  # as PEFT's task models: every adapter trains and saves its own copy of the head
            from .compat_tasks import add_task_head

            add_task_head(model, peft_config, self.TASK_HEADS, _task(peft_config) or type(self).__name__)
        check_tied_modules(model, peft_config)
        resolved = resolved_targets(model, peft_config)
        before = lora_layer_ids(model)
        with drawing_nothing(low_cpu_mem_usage):
            multi.add_adapter(model, adapter_name, peft_config, autocast_adapter_dtype=autocast_adapter_dtype)
        peft_config.target_modules = resolved
        if low_cpu_mem_usage:
            adapter_on_meta(model, adapter_name)
        after_pefts_injection(model, adapter_name, before)  # (unmerged; new modules in train mode, as PEFT's)
        self._new_copies_biases_like_peft(adapter_name)

    def _new_copies_biases_like_peft(self, adapter_name: str) -> None:
        """A new adapter's copy in an existing modules_to_save wrapper (add_adapter, load_adapter) trains
        what its original trains, as PEFT's (its copy is a deepcopy of the original, and an inactive copy's
        requires_grad is left so); with bias="all" on an active adapter the biases too (PEFT switches every
        bias on before it copies). A new wrapper's copies are frozen (PEFT sets that wrapper's adapter)."""
        bias_all = any(self.peft_config[name].bias == "all" for name in self.active_adapters)
        # PEFT freezes every parameter outside the wrappers before it copies: an original's parameter shared with
        # one outside (BERT's decoder.bias is cls.predictions.bias, listed under that name) is copied frozen
        outside = {id(param) for name, param in self.get_base_model().named_parameters()
                   if not is_saved_module_key(name)}
        for _, wrapper in saved_modules(self.get_base_model()):
            if adapter_name in wrapper.modules_to_save and len(wrapper.modules_to_save) > 1 \
                    and adapter_name not in wrapper.active_adapters:
                originals = dict(wrapper.original_module.named_parameters())
                for name, param in wrapper.modules_to_save[adapter_name].named_parameters():
                    original = originals[name]
                    param.requires_grad_((original.requires_grad and id(original) not in outside) or (
                        bias_all and (name == "bias" or name.endswith(".bias"))))

    def set_adapter(self, adapter_name: str, inference_mode: bool = False) -> None:
        """The active adapter: one name, as PEFT's PeftModel (a list fails there: ``model.base_model.set_adapter``,
        PEFT's LoraModel's, takes a list and makes several active; so does ``minilora.set_adapter``)."""
        if not isinstance(adapter_name, str):
            raise MiniLoraError(f"PeftModel.set_adapter takes one adapter name, got {adapter_name!r} (PEFT's fails "
                                "there). To make several adapters active, call model.base_model.set_adapter([...]).")
        self.base_model.set_adapter(adapter_name, inference_mode=inference_mode)
        self.__dict__["_deleted_active"] = None
        self.__dict__["_active_name"] = adapter_name

    def delete_adapter(self, adapter_name: str) -> None:
        """As PEFT's; where no adapter stays active, forward refuses until set_adapter (PEFT's PeftModel
        keeps the deleted name as its active adapter then, and its forward fails with a KeyError)."""
        kept = self.__dict__.get("_active_name")
        self.base_model.delete_adapter(adapter_name)
        if not self.active_adapters and self.__dict__.get("_deleted_active") is None and kept in (None, adapter_name):
            self.__dict__["_deleted_active"] = adapter_name  # (PEFT keeps the first deleted name as active)
        if len(self.active_adapters) == 1:  # (else PEFT's PeftModel keeps the name it had, the deleted one too)
            self.__dict__["_active_name"] = self.active_adapters[0]
        elif self.__dict__.get("_active_name") is None:
            self.__dict__["_active_name"] = adapter_name

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        self._check_kept_name("set_requires_grad")  # (PEFT's reads active_peft_config first)
        self.base_model.set_requires_grad(adapter_names, requires_grad)

    # ----------------------------------------------------------------------------------------
    # Files
    # ----------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True,
                        selected_adapters: Optional[list[str]] = None, save_embedding_layers: Any = "auto",
                        is_main_process: bool = True, path_initial_model_for_weight_conversion: Optional[str] = None,
                        **kwargs: Any) -> None:
        """Every adapter (or ``selected_adapters``) in PEFT's layout, "default" at the root and the
        others in sub-directories, plus the README.md model card PEFT writes.

        ``state_dict`` and ``is_main_process`` are what ``transformers.Trainer`` passes at checkpoints
        (a state dict of the wrapper's keys or of your model's).
        """
        if path_initial_model_for_weight_conversion is not None:
            raise MiniLoraError("save_pretrained: path_initial_model_for_weight_conversion is for PiSSA / OLoRA / "
                                "CorDA adapters, which minilora does not have.")
        state_dict = kwargs.pop("state_dict", None)
        if kwargs:
            raise MiniLoraError(f"save_pretrained: minilora takes no {sorted(kwargs)} (pushing to a hub is out of "
                                "scope: use huggingface_hub's upload_folder on the saved directory).")
        if os.path.isfile(save_directory):
            raise MiniLoraError(f"Provided path ({save_directory}) should be a directory, not a file")
        self._check_kept_name("save_pretrained")
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        if any(name not in self.peft_config for name in names):
            raise MiniLoraError(f"You passed an invalid `selected_adapters` arguments, current supported adapter "
                                f"names are {list(self.peft_config)} - got {selected_adapters}.")
        if state_dict is not None:  # your model's keys, as adapters.save_adapter reads them
            state_dict = {key.removeprefix("base_model.model."): value for key, value in state_dict.items()}
        if not is_main_process:
            return
        saves = multi.prepare_saves(self.get_base_model(), save_directory, names, safe_serialization=safe_serialization,
                                    state_dict=state_dict, save_embedding_layers=save_embedding_layers)
        # (every adapter checked, its warnings given, before anything is written)
        Path(save_directory).mkdir(parents=True, exist_ok=True)
        write_model_card(self.get_base_model(), Path(save_directory))
        multi.write_all(saves, names)

    def push_to_hub(self, *args: Any, **kwargs: Any) -> None:
        """Out of scope: save_pretrained, then upload the directory with huggingface_hub."""
        raise MiniLoraError("minilora does not push to a hub: model.save_pretrained(directory), then "
                            "huggingface_hub.upload_folder(repo_id=..., folder_path=directory).")

    def create_or_update_model_card(self, output_dir: str | os.PathLike) -> None:
        write_model_card(self.get_base_model(), Path(output_dir))

    def load_state_dict(self, state_dict: Any, *args: Any, **kwargs: Any) -> Any:
        """PyTorch's ``load_state_dict``, after catching pitfall 2 (a whole model passed as a state dict)."""
        adapters.reject_whole_module(state_dict, "load_state_dict")
        return super().load_state_dict(state_dict, *args, **kwargs)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, config: Optional[LoraConfig] = None,
                        autocast_adapter_dtype: bool = True, ephemeral_gpu_offload: bool = False,
                        low_cpu_mem_usage: bool = False, key_mapping: Optional[dict] = None,
                        **kwargs: Any) -> "PeftModel":
        """Load the adapter ``model_id`` (a directory saved by minilora or PEFT, or a Hugging Face hub id,
        with PEFT's ``subfolder=`` and ``revision=``) into ``model``: a ``PeftModel`` (the task's
        subclass by the task_type of ``config`` if given, else of the adapter's file, whatever class
        this is called on, as PEFT).

        ``model`` may be a base model (injected with the adapter's config), or one that has matching
        LoRA layers already, e.g. from ``get_peft_model``: its layers get the trained weights (a new
        ``adapter_name`` is added), the loaded adapter becomes the active one, and the same wrapper
        comes back (PEFT wraps it a second time and gives the base outputs: pitfall 1).
        As in PEFT, ``is_trainable=False`` freezes the adapter and puts the model in eval mode, and
        ``config=`` (a LoraConfig equal to the saved one) becomes the adapter's config object.
        """
        adapters.reject_whole_module(model_id, "PeftModel.from_pretrained")
        check_load_options(autocast_adapter_dtype, ephemeral_gpu_offload, low_cpu_mem_usage, key_mapping, kwargs)
        directory = adapters._adapter_directory(resolve_adapter_source(model_id, kwargs, "PeftModel.from_pretrained"))
        wrapper = model if isinstance(model, PeftModel) else None
        inner = model.get_base_model() if wrapper is not None else model
        # The files are read once, before any change (a bad config is refused first), and loaded as read: the
        # config here is the one the weights are loaded with, even while another process saves (minilora/files.py).
        files = read_files(inner, directory)
        try:  # (load_adapter closes the weights file once read, or refused; so does a refusal before it)
            fields = files.fields
            saved = config_from_fields(fields, files.config_origin)
            peft_config = pefts_config(fields, files.config_origin)
            if config is not None:
                check_given_config(config, saved, directory)
            from .compat_tasks import TASK_MODELS

            # PEFT's class is the one of the task_type of the config it loads with: the caller's config= if given,
            # else the file's; ``cls`` only where that task has no class of its own (peft_model.py,
            # PeftModel.from_pretrained)
            task_class = TASK_MODELS.get(_task(config if config is not None else peft_config), cls)
            if wrapper is None:
                task_class._check_task_fits(inner)
                check_task_head_saved(inner, task_class, saved, directory)
            had_layers = any(True for _ in lora_layers(inner))
            existed = adapter_name in adapter_configs(inner)  # (a new name is drawn once, by load_adapter)
            if existed:  # PEFT builds a new adapter and checks the saved tying; load_adapter does when it builds one
                check_saved_tying(inner, fields)
        except BaseException:
            files.close()
            raise
        with drawing_nothing(low_cpu_mem_usage):
            adapters.load_adapter(inner, files, is_trainable=is_trainable, adapter_name=adapter_name,
                                  autocast_adapter_dtype=autocast_adapter_dtype)
            if existed:
                draw_like_peft_rewrap(inner, adapter_name, saved)
        if had_layers:  # the loaded adapter is the one that runs, as after PEFT's own from_pretrained
            multi.set_adapter(inner, adapter_name, inference_mode=not is_trainable)
        else:
            leave_new_layers_in_train_mode(inner, adapter_name)
            if not is_trainable:
                freeze_for_inference(inner, saved.bias)
        if config is not None:  # the given object is the adapter's config, with its lora_dropout, as in PEFT
            config.inference_mode = not is_trainable
            keep_the_layout_injection_set(inner, adapter_name, config)
            if config.lora_dropout != saved.lora_dropout:
                adapters._adopt_adapter_config(inner, config, adapter_name)  # its dropout on the layers
            set_adapter_config(inner, adapter_name, config)
        else:
            keep_pefts_config(inner, adapter_name, peft_config, is_trainable)
        if task_class.TASK_HEADS:  # PEFT's task model appends its heads to the config it is made with (the file's lists them)
            from .compat_tasks import append_heads

            append_heads(adapter_configs(inner)[adapter_name], task_class.TASK_HEADS)
        if wrapper is None:
            wrapper = task_class._wrapping(inner)
        wrapper.__dict__["_active_name"] = adapter_name  # (PEFT's new PeftModel is made with it)
        if not is_trainable:
            wrapper.eval()
        return wrapper

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False,
                     torch_device: Optional[str] = None, autocast_adapter_dtype: bool = True,
                     ephemeral_gpu_offload: bool = False, low_cpu_mem_usage: bool = False,
                     key_mapping: Optional[dict] = None, **kwargs: Any) -> _IncompatibleKeys:
        """Read a saved adapter in as ``adapter_name`` (new: inactive; frozen unless ``is_trainable``).
        An adapter of that name the model has already gets the saved A and B, and keeps its config and
        which parameters train, as in PEFT (``transformers.Trainer`` does this to resume from a
        checkpoint and to reload the best one). As PEFT, ``is_trainable=False`` puts the model in eval
        mode. Loading is strict, so the returned missing / unexpected keys are always empty."""
        kwargs["torch_device"] = torch_device
        check_load_options(autocast_adapter_dtype, ephemeral_gpu_offload, low_cpu_mem_usage, key_mapping, kwargs)
        directory = adapters._adapter_directory(resolve_adapter_source(model_id, kwargs, "load_adapter"))
        files = read_files(self.get_base_model(), directory)  # (once, before any change; loaded as read)
        if adapter_name in self.peft_config:
            load_into_existing_adapter(self.get_base_model(), files, adapter_name)
            if autocast_adapter_dtype:  # (as PEFT's load_adapter, for an adapter the model had too)
                upcast_adapter(self.get_base_model(), adapter_name)
        else:
            peft_config = pefts_config(files.fields, files.config_origin)
            refuse_base_weights_into_merged_layers(self.get_base_model(), files)
            before = lora_layer_ids(self.get_base_model())
            with drawing_nothing(low_cpu_mem_usage):
                adapters.load_adapter(self.get_base_model(), files, is_trainable=is_trainable,
                                      adapter_name=adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
            keep_pefts_config(self.get_base_model(), adapter_name, peft_config, is_trainable, before)
            if self.TASK_HEADS:  # PEFT's task model's add_adapter appends its heads (the file's lists them already)
                from .compat_tasks import append_heads

                append_heads(peft_config, self.TASK_HEADS)
            unmerge_as_pefts_injection(self.get_base_model())  # (PEFT's load_adapter injects as add_adapter does)
            train_new_lora_biases_if_bias_all(self.get_base_model(), adapter_name)
            self._new_copies_biases_like_peft(adapter_name)
            if is_trainable:  # PEFT's new modules start in train mode; is_trainable=False then calls eval()
                leave_new_layers_in_train_mode(self.get_base_model(), adapter_name, before)
                # and everything of the new adapter trains, its copies in modules_to_save wrappers that another adapter
                # made too (inactive copies start frozen): PEFT's load_adapter calls set_requires_grad(adapter_name)
                self.base_model.set_requires_grad(adapter_name, True)
        if not is_trainable:
            self.eval()
        return _IncompatibleKeys(missing_keys=[], unexpected_keys=[])


def _inputs_require_grad(model: nn.Module) -> None:
    """PEFT's ``prepare_model_for_gradient_checkpointing``: with gradient checkpointing the frozen
    embedding's output must require grad, or no gradient reaches the adapters."""
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    elif hasattr(model, "get_input_embeddings"):
        model.get_input_embeddings().register_forward_hook(lambda module, inputs, output: output.requires_grad_(True))


__all__ = ["AutoPeftModel", "AutoPeftModelForCausalLM", "AutoPeftModelForFeatureExtraction",
           "AutoPeftModelForQuestionAnswering", "AutoPeftModelForSeq2SeqLM", "AutoPeftModelForSequenceClassification",
           "AutoPeftModelForTokenClassification", "LoraConfig", "LoraModel", "PeftModel", "get_base_model_state_dict", "get_peft_model_state_dict",
           "inject_adapter_in_model", "set_base_model_state_dict", "set_peft_model_state_dict", "PeftModelForCausalLM", "PeftModelForFeatureExtraction",
           "PeftModelForQuestionAnswering", "PeftModelForSeq2SeqLM", "PeftModelForSequenceClassification",
           "PeftModelForTokenClassification", "TaskType", "get_peft_model", "ModulesToSaveWrapper"]

# PEFT's task wrappers (compat_tasks.py) and AutoPeftModel classes (compat_auto.py) are named here too, as PEFT's are
# in `peft`, but they subclass PeftModel (or build on those that do), so their files import this one. This file
# imports theirs only when one of their names is first asked for: `from minilora.compat import PeftModelForCausalLM`
# or `minilora.compat.TASK_MODELS` calls the module's __getattr__ below (PEP 562), and the functions above import
# what they need inside (as PEFT's PeftModel.from_pretrained imports MODEL_TYPE_TO_PEFT_MODEL_MAPPING from
# peft/auto.py). So every file imports in one direction and may be imported first, and the classes keep their
# own module: inspect.getsource finds them, and a pickled wrapper names minilora.compat_tasks. (The other cure,
# PeftModel moved to a file of its own and this one a list of imports, would move this file's whole lesson away
# from the name learners import.) Files pickled by minilora.compat's name before the split still load: unpickling
# looks the name up here. (_forward_with_labels: the forward such a file holds.)
_TASK_NAMES = ("TASK_MODELS", "PeftModelForCausalLM", "PeftModelForFeatureExtraction", "PeftModelForQuestionAnswering",
               "PeftModelForSeq2SeqLM", "PeftModelForSequenceClassification", "PeftModelForTokenClassification",
               "add_task_head", "check_head_not_targeted", "_forward_with_labels")
_AUTO_NAMES = ("AutoPeftModel", "AutoPeftModelForCausalLM", "AutoPeftModelForFeatureExtraction",
               "AutoPeftModelForQuestionAnswering", "AutoPeftModelForSeq2SeqLM",
               "AutoPeftModelForSequenceClassification", "AutoPeftModelForTokenClassification")


def __getattr__(name: str) -> Any:
    """A name of compat_tasks.py or compat_auto.py, imported on first use (PEP 562: Python calls this
    only for a name the module does not have)."""
    if name in _TASK_NAMES:
        from . import compat_tasks

        return getattr(compat_tasks, name)
    if name in _AUTO_NAMES:
        from . import compat_auto

        return getattr(compat_auto, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    """dir(minilora.compat) lists those names too."""
    return sorted({*globals(), *_TASK_NAMES, *_AUTO_NAMES})
