"""modules_to_save: whole modules trained in full next to the adapters (a classification head, say).

A freshly initialised head (``BertForSequenceClassification.classifier``) has nothing to learn from a
low-rank update: it must be trained in full, and saved with the adapter. PEFT's
``ModulesToSaveWrapper`` does this by keeping two copies, and so does ``ModulesToSave`` here:

    classifier.original_module             the module as it was: frozen, used while the adapters are
                                           disabled and given back by ``unload``
    classifier.modules_to_save.default     a deep copy that trains, is saved, and is what
                                           ``merge_and_unload`` leaves in the model

The in-memory names are PEFT's, so trainable names and counts are PEFT's. In the adapter file the
copy is stored under the module's own name (``base_model.model.classifier.weight``), as PEFT stores it.

Which modules: PEFT's rule (``peft/utils/other.py::_set_trainable``): every module whose full name
*ends with* an entry of ``modules_to_save`` (a plain string test, no dot boundary: ``"classifier"``
matches ``"classifier"`` and ``"bert.classifier"``).
"""

from __future__ import annotations

import copy
from typing import Any, Iterator, Optional

from torch import nn

from .config import MiniLoraError

ADAPTER_NAME = "default"


class ModulesToSave(nn.Module):
    """``module`` kept as ``original_module`` (frozen) plus a trainable copy in ``modules_to_save["default"]``.

    Forward runs the copy, or the original while ``disabled``. Attributes the wrapper does not have
    (``weight``, ``out_features``, ...) are read from the module that runs, as in PEFT.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict({ADAPTER_NAME: copy.deepcopy(module)})
        self.disabled = False
        self.original_module.requires_grad_(False)
        self.trained.requires_grad_(True)

    @property
    def trained(self) -> nn.Module:
        """The copy that trains and is saved."""
        return self.modules_to_save[ADAPTER_NAME]

    @property
    def active(self) -> nn.Module:
        """The module forward runs: the original while disabled, else the trained copy."""
        return self.original_module if self.disabled else self.trained

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.active(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)  # parameters, buffers and submodules of the wrapper itself
        except AttributeError:
            if "_modules" not in self.__dict__ or name in ("original_module", "modules_to_save"):
                raise
            return getattr(self.active, name)


def saved_modules(model: nn.Module) -> Iterator[tuple[str, ModulesToSave]]:
    """(name, wrapper) for every ModulesToSave in the model, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSave):
            yield name, module


def find_modules_to_save(model: nn.Module, names: Optional[list[str]], lora_targets: list[str] = ()) -> list[str]:
    """The names of the modules ``names`` selects, by PEFT's rule (the full name ends with an entry).

    Raises:
        MiniLoraError: if ``names`` is given but selects nothing (PEFT then silently trains no extra
            module), or selects a LoRA target, a module inside another selected one, or a container
            (ModuleList / ModuleDict) that has no forward of its own.
    """
    if not names:
        return []
    chosen = [key for key, _ in model.named_modules(remove_duplicate=False)
              if key and any(key.endswith(name) for name in names)]
    chosen = list(dict.fromkeys(chosen))  # a module reachable under two names is listed under each, once
    if not chosen:
        raise MiniLoraError(
            f"modules_to_save={names} matches no module of this {type(model).__name__} (a module is selected when "
            "its full name ends with an entry). PEFT would silently train no extra module; minilora refuses. "
            f"Top-level modules: {[name for name, _ in model.named_children()]}."
        )
    modules = dict(model.named_modules(remove_duplicate=False))
    for key in chosen:
        if key in lora_targets or any(key.startswith(f"{target}.") or target.startswith(f"{key}.")
                                      for target in lora_targets):
            raise MiniLoraError(f"{key!r} is both a LoRA target and in modules_to_save; a module is either adapted "
                                "or trained in full. Remove it from one of the two.")
        outer = [other for other in chosen if key.startswith(f"{other}.")]
        if outer:
            raise MiniLoraError(f"modules_to_save selects {key!r} inside {outer[0]!r}, which it also selects; name "
                                "only the outer module.")
        if isinstance(modules[key], (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)):
            raise MiniLoraError(f"modules_to_save selects {key!r}, a {type(modules[key]).__name__} (a container "
                                "with no forward of its own), as PEFT refuses too. Name the modules inside it.")
    return chosen


def wrap_modules_to_save(model: nn.Module, names: list[str]) -> None:
    """Replace each named module by a ModulesToSave around it (copy trainable, original frozen)."""
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapper = ModulesToSave(getattr(parent, child))
        wrapper.train(wrapper.original_module.training)
        setattr(parent, child, wrapper)


def mark_saved_modules_trainable(model: nn.Module) -> None:
    """Trainable copies, frozen originals (after the rest of the model was frozen)."""
    for _, wrapper in saved_modules(model):
        wrapper.original_module.requires_grad_(False)
        wrapper.trained.requires_grad_(True)


def unwrap_saved_modules(model: nn.Module, keep: str) -> None:
    """Put plain modules back: ``keep="trained"`` (merge_and_unload, as PEFT) or ``"original"`` (unload:
    the base model again; PEFT's ``unload`` keeps the trained copy here, though its docstring promises
    "the base model")."""
    for name, wrapper in list(saved_modules(model)):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, wrapper.trained if keep == "trained" else wrapper.original_module)


# --------------------------------------------------------------------------------------------
# File keys: PEFT stores the copy under the module's own name
# --------------------------------------------------------------------------------------------
COPY_PART = f".modules_to_save.{ADAPTER_NAME}."


def saved_state(model: nn.Module, state: dict) -> dict:
    """{file key (without base_model.model.): tensor} for every trained copy, e.g. ``classifier.weight``."""
    names = [name for name, _ in saved_modules(model)]
    return {key.replace(COPY_PART, ".", 1): value for key, value in state.items()
            if any(key.startswith(f"{name}{COPY_PART}") for name in names)}


def to_model_keys(tensors: dict, names: list[str]) -> dict:
    """File keys -> the model's keys once wrapped: ``classifier.weight`` -> ``classifier.modules_to_save.default.weight``."""
    renamed = {}
    for key, value in tensors.items():
        owner = next((name for name in names if key.startswith(f"{name}.")), None)
        renamed[key if owner is None else f"{owner}{COPY_PART}{key[len(owner) + 1:]}"] = value
    return renamed


def expected_saved_shapes(model: nn.Module, names: list[str]) -> dict[str, tuple[int, ...]]:
    """{model key of the copy: shape} for each saved module, wrapped or not yet."""
    shapes = {}
    for name in names:
        module = model.get_submodule(name)
        module = module.trained if isinstance(module, ModulesToSave) else module
        for key, value in module.state_dict().items():
            shapes[f"{name}{COPY_PART}{key}"] = tuple(value.shape)
    return shapes


def is_saved_module_key(key: str) -> bool:
    """True for a state-dict key inside a ModulesToSave (its original or its copy)."""
    return COPY_PART in f".{key}" or ".original_module." in f".{key}"


def original_key(key: str) -> str:
    """``classifier.modules_to_save.default.weight`` -> ``classifier.weight`` (the unwrapped module's key)."""
    return key.replace(COPY_PART, ".", 1).replace(".original_module.", ".", 1)
