"""modules_to_save: whole modules trained in full next to the adapters (a classification head, say).

A freshly initialised head (``BertForSequenceClassification.classifier``) has nothing to learn from a
low-rank update: it must be trained in full, and saved with the adapter. PEFT's
``ModulesToSaveWrapper`` does this by keeping two copies, and so does ``ModulesToSave`` here:

    classifier.original_module             the module as it was: frozen, used while the adapters are
                                           disabled and given back by ``unload``
    classifier.modules_to_save.default     a deep copy that trains, is saved, and is what
                                           ``merge_and_unload`` leaves in the model
    classifier.modules_to_save.<other>     with several adapters, one copy each (of the original);
                                           the active adapter's copy runs and trains

The in-memory names are PEFT's, so trainable names and counts are PEFT's. In the adapter file the
copy is stored under the module's own name (``base_model.model.classifier.weight``), as PEFT stores it.

Which modules: PEFT's rule (``peft/utils/other.py::_set_trainable``): every module whose full name
*ends with* an entry of ``modules_to_save`` (a plain string test, no dot boundary: ``"classifier"``
matches ``"classifier"`` and ``"bert.classifier"``).
"""

from __future__ import annotations

import copy
import re
from typing import Any, Iterator, Optional

import torch
from torch import nn

from .config import MiniLoraError

BASE = "__base__"  # in a mixed batch, the rows that get no adapter (PEFT's name)


class SavedModuleTypeError(MiniLoraError, TypeError):
    """modules_to_save on a module it cannot wrap (PEFT raises a TypeError here, so this is one too)."""


class MixedBatchTypeError(MiniLoraError, TypeError):
    """A module a mixed batch cannot split by rows (PEFT raises a TypeError here, so this is one too)."""


class ModulesToSave(nn.Module):
    """``module`` kept as ``original_module`` (frozen) plus one trainable copy per adapter in
    ``modules_to_save[adapter]``.

    At most one copy is active (``active_adapters`` holds its name, or nothing): forward runs it, or
    the original while ``disabled`` or when no adapter with a copy here is active, as PEFT's
    ``ModulesToSaveWrapper`` does. Attributes the wrapper does not have (``weight``,
    ``out_features``, ...) are read from the module that runs, as in PEFT.
    """

    # PEFT's names for the per-adapter tables (its code walks them, e.g. to check requires_grad)
    adapter_layer_names = ("modules_to_save",)
    other_param_names = ()

    def __init__(self, module: nn.Module, adapter_name: str, active: bool = True) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.disabled = False
        self.original_module.requires_grad_(False)
        self.add(adapter_name)
        self.set_adapter([adapter_name] if active else [])

    def add(self, adapter_name: str) -> None:
        """A new copy of the *original* module for ``adapter_name`` (PEFT's ``update``), frozen until
        ``set_adapter`` makes it the active one."""
        self.modules_to_save[adapter_name] = copy.deepcopy(self.original_module).requires_grad_(False)

    def set_adapter(self, adapter_names: list[str], inference_mode: bool = False) -> None:
        """Of ``adapter_names``, the one with a copy here becomes active and trains (unless
        ``inference_mode``); the copy that was active is frozen. None of them: the original runs.

        The other copies keep their requires_grad, as in PEFT's ``ModulesToSaveWrapper.set_adapter``
        (with bias="all" an inactive copy's bias may train: PEFT leaves it so).

        Raises:
            MiniLoraError: if two of them have a copy here (PEFT: only one can be active at a time).
        """
        here = self.copies_among(adapter_names)
        for name in self.active_adapters:
            self.modules_to_save[name].requires_grad_(False)
        if here:
            self.modules_to_save[here[0]].requires_grad_(not inference_mode)
        self.active_adapters = here

    def copies_among(self, adapter_names: list[str]) -> list[str]:
        """The names among ``adapter_names`` that have a copy here; MiniLoraError if more than one."""
        here = [name for name in adapter_names if name in self.modules_to_save]
        if len(here) > 1:
            raise MiniLoraError(f"Only one adapter can be set at a time for ModulesToSaveWrapper (PEFT's words): "
                                f"adapters {here} each have their own copy of this module in modules_to_save, and "
                                "forward runs one copy. Activate one of them, or adapters whose modules_to_save do "
                                "not overlap.")
        return here

    def delete(self, adapter_name: str) -> None:
        """Remove ``adapter_name``'s copy (if it was the active one, the original runs now)."""
        if adapter_name in self.modules_to_save:
            del self.modules_to_save[adapter_name]
        self.active_adapters = [name for name in self.active_adapters if name != adapter_name]

    @property
    def trained(self) -> nn.Module | None:
        """The active copy (the one that trains and that ``merge_and_unload`` leaves), or None."""
        return self.modules_to_save[self.active_adapters[0]] if self.active_adapters else None

    @property
    def active(self) -> nn.Module:
        """The module forward runs: the original while disabled or without an active copy, else the active copy."""
        return self.original_module if self.disabled or self.trained is None else self.trained

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.mixed_rows is not None and not self.disabled:
            return self.forward_rows(self.mixed_rows, *args, **kwargs)
        return self.active(*args, **kwargs)

    # In a mixed batch (minilora/mixed.py) {adapter: its rows}: each row runs its adapter's copy, "__base__"
    # rows the original (PEFT's ``AuxiliaryTrainingWrapper._mixed_batch_forward``). None: one module for all.
    mixed_rows: dict[str, list[int]] | None = None
    MIXED_BATCH_TYPES = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)  # PEFT's SUPPORTED_MODULES

    def forward_rows(self, rows: dict[str, list[int]], x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Row i of ``x`` through the copy of the adapter whose rows hold i, or the original for "__base__"."""
        if not isinstance(self.original_module, self.MIXED_BATCH_TYPES):
            names = ", ".join(kind.__name__ for kind in self.MIXED_BATCH_TYPES)
            raise MixedBatchTypeError(f"Mixed batching is only supported for the following modules: {names}. "
                                      f"This modules_to_save module is a {type(self.original_module).__name__} "
                                      "(PEFT's rule and words): run the rows of each adapter as separate batches.")
        missing = sorted(name for name in rows if name != BASE and name not in self.modules_to_save)
        if missing:
            raise MiniLoraError(f"Adapters {missing} have no copy of this modules_to_save module (it has "
                                f"{sorted(self.modules_to_save)}), so their rows have no module to run.")
        outputs = {name: (self.original_module if name == BASE else self.modules_to_save[name])(
            x[index], *args, **kwargs) for name, index in rows.items()}  # (rows of name, ...) each
        first = next(iter(outputs.values()))
        result = first.new_empty((sum(len(index) for index in rows.values()), *first.shape[1:]))
        for name, index in rows.items():
            result[index] = outputs[name]
        return result

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


# The modules inside PEFT's lora.Linear, which PEFT's modules_to_save rule sees (minilora's LoraLinear has the first four)
LORA_LAYER_CHILDREN = ("base_layer", "lora_dropout", "lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B",
                       "lora_magnitude_vector")


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
    # PEFT wraps modules_to_save after injecting, so its rule also sees each new LoRA layer's own modules
    # (``q_proj.lora_dropout``, ...): modules_to_save=["dropout"] reaches a ModuleDict there, a TypeError in PEFT.
    insides = [f"{target}.{child}" for target in lora_targets for child in LORA_LAYER_CHILDREN]
    reached = [key for key in insides if any(key.endswith(name) for name in names)]
    if reached:
        raise SavedModuleTypeError(f"modules_to_save={names} also selects {reached[0]!r}, a module inside a new LoRA "
                                   "layer (PEFT matches modules_to_save after injecting, and raises a TypeError "
                                   "here). Name the modules to save by a longer, dotted name.")
    modules = dict(model.named_modules(remove_duplicate=False))
    lora = tuple(name for name, module in modules.items() if hasattr(module, "lora_A") and hasattr(module, "base_layer"))
    adapted = [key for key in chosen if key in lora or key.startswith(tuple(f"{name}." for name in lora))]
    if adapted:
        raise SavedModuleTypeError(f"modules_to_save={names} selects {adapted[0]!r}, which holds an adapter already "
                                   "(a LoRA layer, or inside one). PEFT cannot wrap it (a TypeError): a module is "
                                   "either adapted or trained in full. Remove it from one of the two.")
    holding = [key for key in chosen if any(name.startswith(f"{key}.") for name in lora)]
    if holding:  # PEFT copies the LoRA layers into the trained copy; minilora keeps the two ideas apart
        raise MiniLoraError(f"modules_to_save={names} selects {holding[0]!r}, which holds LoRA layers of another "
                            "adapter: training it in full would train copies of those adapters too (PEFT copies "
                            "them, minilora does not). Name a module without LoRA layers in it.")
    wrappers = [name for name, module in modules.items() if isinstance(module, ModulesToSave)]
    nesting = [(key, inner) for key in chosen for inner in wrappers if inner.startswith(f"{key}.")]
    if nesting:  # the same: PEFT copies the inner wrapper (its modes then differ from minilora's copy)
        raise MiniLoraError(f"modules_to_save={names} selects {nesting[0][0]!r}, which holds {nesting[0][1]!r}, a "
                            "module another adapter trains in full (modules_to_save): training the outer one in "
                            "full would train copies of that adapter's copy too (PEFT nests the wrappers, minilora "
                            "does not). Name a module without such a module in it.")
    inside = [(key, outer) for key in chosen for outer in wrappers if key.startswith(f"{outer}.")]
    if inside:  # PEFT adds this adapter's copy of the whole outer module; minilora does not nest them
        raise MiniLoraError(f"modules_to_save={names} selects {inside[0][0]!r}, inside {inside[0][1]!r}, a module "
                            "another adapter trains in full (modules_to_save): PEFT then trains a copy of the whole "
                            f"{inside[0][1]!r} for this adapter, minilora does not nest them. Name {inside[0][1]!r} "
                            "itself, or a module outside it.")
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
            raise SavedModuleTypeError(f"modules_to_save cannot be applied to modules of type {type(modules[key])}: "
                                       f"modules_to_save selects {key!r}, a {type(modules[key]).__name__} (a container "
                                       "with no forward of its own), as PEFT refuses too. Name the modules inside it.")
    return chosen


def wrap_modules_to_save(model: nn.Module, names: list[str], adapter_name: str, active: bool = True) -> None:
    """Give ``adapter_name`` a trainable copy of each named module: a module wrapped already (by another
    adapter) gets one more copy, a plain one is replaced by a ModulesToSave around it. ``active``: the
    new copies run now (inject); otherwise they wait for ``set_adapter`` (add_adapter, as PEFT's)."""
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        module = getattr(parent, child)
        if isinstance(module, ModulesToSave):
            module.add(adapter_name)
            continue
        wrapper = ModulesToSave(module, adapter_name, active)
        wrapper.train(wrapper.original_module.training)
        setattr(parent, child, wrapper)


def set_saved_modules_adapter(model: nn.Module, adapter_names: list[str], inference_mode: bool = False) -> None:
    """Every ModulesToSave runs the copy of the one adapter among ``adapter_names`` it has (or its
    original); checked on every wrapper before any changes. An empty list, where the model has such a
    module, is refused as PEFT refuses it (its ModulesToSaveWrapper.check_set_adapter)."""
    wrappers = [wrapper for _, wrapper in saved_modules(model)]
    if wrappers and not adapter_names:
        raise MiniLoraError("Please specify at least one adapter to set (PEFT's words): this model has modules in "
                            "modules_to_save, and PEFT refuses set_adapter([]) for them. Name the adapter to run, or "
                            "use disable_adapter_layers() / `with model.disable_adapter():` for the base model.")
    for wrapper in wrappers:
        wrapper.copies_among(adapter_names)
    for wrapper in wrappers:
        wrapper.set_adapter(adapter_names, inference_mode)


def mark_saved_modules_trainable(model: nn.Module) -> None:
    """Trainable active copies, frozen originals and other copies (after the rest of the model was frozen)."""
    for _, wrapper in saved_modules(model):
        wrapper.original_module.requires_grad_(False)  # (bias="all" switched its bias on with every other bias)
        for name, trained in wrapper.modules_to_save.items():
            trained.requires_grad_(name in wrapper.active_adapters)


def check_can_delete_copies(model: nn.Module, adapter_name: str, new_active: list[str]) -> None:
    """Raise MiniLoraError, before anything changes, where PEFT's ``ModulesToSaveWrapper.delete_adapter``
    fails: a wrapper holds a copy of ``adapter_name`` and ``new_active`` (the adapters the first LoRA
    layer will keep active) names several adapters (PEFT's ValueError), or names first an adapter with a
    copy there while that wrapper runs no copy (PEFT reads ``active_adapters[0]`` of an empty list)."""
    for name, wrapper in saved_modules(model):
        if adapter_name not in wrapper.modules_to_save:
            continue
        if len(new_active) > 1:
            raise MiniLoraError(f"Attempted to set multiple ({new_active}) adapters at once for ModulesToSaveWrapper, "
                                f"which is not allowed (PEFT's words): deleting {adapter_name!r} leaves {new_active} "
                                f"active, and {name!r} holds a copy of {adapter_name!r} in modules_to_save, which "
                                "runs one copy at a time. set_adapter to a single adapter first, then delete.")
        if new_active and new_active[0] in wrapper.modules_to_save and not wrapper.active_adapters:
            raise MiniLoraError(f"Deleting {adapter_name!r} would switch {name!r} (modules_to_save) to the copy of "
                                f"{new_active[0]!r} while it runs no copy now, where PEFT fails (an IndexError in "
                                f"ModulesToSaveWrapper.delete_adapter). Call set_adapter({new_active[0]!r}) first, "
                                "then delete.")


def delete_saved_copies(model: nn.Module, adapter_name: str, new_active: list[str]) -> None:
    """Drop ``adapter_name``'s copies, as PEFT's ``ModulesToSaveWrapper.delete_adapter``: a wrapper with
    such a copy then runs the copy of ``new_active`` (the one adapter the first LoRA layer kept active;
    ``check_can_delete_copies`` refuses several) if it has one, else its original. A wrapper without such
    a copy is left as it is, even if it runs no copy because the deleted adapter was the active one (PEFT's
    rule: ``set_adapter`` again to switch it to a remaining adapter's copy). A wrapper left without copies stays (the model's keys stay PEFT's)."""
    for _, wrapper in saved_modules(model):
        if adapter_name not in wrapper.modules_to_save:
            continue
        new = new_active if new_active and new_active[0] in wrapper.modules_to_save else []
        if new and new != wrapper.active_adapters:  # (PEFT calls set_adapter only for another copy)
            wrapper.set_adapter(new)
        elif not new:
            wrapper.active_adapters = []  # (no copy runs; PEFT leaves every requires_grad as it was)
        wrapper.delete(adapter_name)


def unwrap_saved_modules(model: nn.Module, keep: str) -> None:
    """Put plain modules back: ``keep="trained"`` (merge_and_unload, as PEFT: the active copy, or the
    original where no copy is active) or ``"original"`` (unload: the base model again; PEFT's ``unload``
    keeps the trained copy here, though its docstring promises "the base model")."""
    for name, wrapper in list(saved_modules(model)):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        kept = wrapper.trained if keep == "trained" and wrapper.trained is not None else wrapper.original_module
        setattr(parent, child, kept)


# --------------------------------------------------------------------------------------------
# File keys: PEFT stores an adapter's copy under the module's own name
# --------------------------------------------------------------------------------------------
def copy_part(adapter_name: str) -> str:
    """The part of a key that says "adapter_name's copy": ``classifier.modules_to_save.<adapter>.weight``."""
    return f".modules_to_save.{adapter_name}."


def saved_state(model: nn.Module, state: dict, adapter_name: str) -> dict:
    """{file key (without base_model.model.): tensor} for each of ``adapter_name``'s copies, e.g.
    ``classifier.weight``."""
    part = copy_part(adapter_name)
    names = [name for name, wrapper in saved_modules(model) if adapter_name in wrapper.modules_to_save]
    return {key.replace(part, ".", 1): value for key, value in state.items()
            if any(key.startswith(f"{name}{part}") for name in names)}


def to_model_keys(tensors: dict, names: list[str], adapter_name: str) -> dict:
    """File keys -> the model's keys once wrapped: ``classifier.weight`` ->
    ``classifier.modules_to_save.<adapter>.weight``."""
    renamed = {}
    for key, value in tensors.items():
        owner = next((name for name in names if key.startswith(f"{name}.")), None)
        renamed[key if owner is None else f"{owner}{copy_part(adapter_name)}{key[len(owner) + 1:]}"] = value
    return renamed


def expected_saved_shapes(model: nn.Module, names: list[str], adapter_name: str) -> dict[str, tuple[int, ...]]:
    """{model key of ``adapter_name``'s copy: shape} for each saved module, wrapped or not yet."""
    shapes = {}
    for name in names:
        module = model.get_submodule(name)
        module = module.original_module if isinstance(module, ModulesToSave) else module  # (copies have its shapes)
        for key, value in module.state_dict().items():
            shapes[f"{name}{copy_part(adapter_name)}{key}"] = tuple(value.shape)
    return shapes


SAVED_MODULE_PART = re.compile(r"\.(modules_to_save\.[^.]+|original_module)\.")


def is_saved_module_key(key: str) -> bool:
    """True for a state-dict key inside a ModulesToSave (its original or a copy)."""
    return SAVED_MODULE_PART.search(f".{key}") is not None


def original_key(key: str, wrapped: bool = False) -> str:
    """``classifier.modules_to_save.<adapter>.weight`` -> ``classifier.weight`` (the unwrapped module's key),
    or with ``wrapped`` ``classifier.original_module.weight`` (the original's key inside the wrapper)."""
    return SAVED_MODULE_PART.sub(".original_module." if wrapped else ".", f".{key}", count=1)[1:]


# With bias="all" PEFT's files also hold, for each saved module with a bias, the frozen original's
# bias and the copy's bias a second time, under these keys (the adapter's name left out, as PEFT does):
#     classifier.original_module.bias     (loaded into the original, as PEFT loads it)
#     classifier.modules_to_save.bias     (the copy's bias again; PEFT's loading ignores it, so does ours)
BIAS_ALL_ORIGINAL, BIAS_ALL_COPY = "original_module.bias", "modules_to_save.bias"


def nested_bias_all_keys(model: nn.Module, names: list[str], keys: list[str]) -> tuple[list[str], list[str]]:
    """For a saved module with biases below its top level (a head built of ``dense`` and ``out_proj``),
    PEFT's bias="all" files hold ``classifier.original_module.dense.bias`` (loaded into the original, as
    PEFT loads it) and the copy's ``classifier.modules_to_save.<adapter>.dense.bias`` again (ignored, as
    the copy's own key holds the same values): (original keys, repeated copy keys) among ``keys``."""
    originals, repeats = [], []
    for name in names:
        module = model.get_submodule(name)
        module = module.original_module if isinstance(module, ModulesToSave) else module
        nested = [path for path, _ in module.named_parameters() if path.endswith(".bias")]
        for path in nested:
            originals += [key for key in keys if key == f"{name}.original_module.{path}"]
            repeats += [key for key in keys if re.fullmatch(rf"{re.escape(name)}\.modules_to_save\.[^.]+\.{re.escape(path)}",
                                                            key)]
    return originals, repeats


def bias_all_keys(model: nn.Module, names: list[str]) -> list[str]:
    """The ``<module>.original_module.bias`` keys bias="all" adds for these saved modules (those with a bias)."""
    keys = []
    for name in names:
        module = model.get_submodule(name)
        module = module.original_module if isinstance(module, ModulesToSave) else module
        if getattr(module, "bias", None) is not None:
            keys.append(f"{name}.{BIAS_ALL_ORIGINAL}")
    return keys
