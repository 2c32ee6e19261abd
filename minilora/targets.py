"""Choosing the layers that get LoRA, by PEFT's rules.

A config names its targets in one of four ways, resolved here exactly as PEFT 0.21.2 resolves them
(``peft/tuners/tuners_utils.py``: ``inject_adapter``, ``check_target_module_exists``,
``_maybe_include_all_linear_layers``):

- ``target_modules=None``: the architecture's default, from ``DEFAULT_TARGET_MODULES`` below (keyed
  by ``model.config.model_type``); an architecture without one is an error, as in PEFT.
- a list of names: a module is a target when its full name is in the list or ends with
  ``"." + entry`` (``"q_proj"`` matches ``"model.layers.0.self_attn.q_proj"``).
- a string: a regex that must match the full name (``re.fullmatch``).
- ``"all-linear"``: every ``nn.Linear`` / ``Conv1D`` except the model's output layer.

Then the narrowing selectors: ``exclude_modules`` (same list / regex rule) removes modules,
``layers_to_transform`` (+ ``layers_pattern``) keeps only some layer indices (list targets only),
and ``modules_to_save`` modules are never targets. ``rank_pattern`` / ``alpha_pattern`` pick a
per-layer ``r`` / ``lora_alpha`` by PEFT's ``get_pattern_key`` rule (``layer_rank_and_alpha``).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Optional

from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import ALL_LINEAR, LoraConfig, MiniLoraError
from . import bounded_regex  # re.match / re.fullmatch with a time bound (hostile files)
from .layer import LoraLinear

# PEFT's default targets per model_type (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING in
# peft/utils/constants.py, 0.21.2), copied as data: tests/test_targets.py compares it with the
# installed PEFT key by key. A string is a regex (gemma4's targets live in its language model).
DEFAULT_TARGET_MODULES: dict[str, list[str] | str] = {
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "bloom": ["query_key_value"],
    "blip-2": ["q", "v", "q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "gpt_neo": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "deberta": ["in_proj"],
    "layoutlm": ["query", "value"],
    "llama": ["q_proj", "v_proj"],
    "llama4": ["q_proj", "v_proj"],
    "chatglm": ["query_key_value"],
    "gpt_bigcode": ["c_attn"],
    "mpt": ["Wqkv"],
    "RefinedWebModel": ["query_key_value"],
    "RefinedWeb": ["query_key_value"],
    "falcon": ["query_key_value"],
    "btlm": ["c_proj", "c_attn"],
    "codegen": ["qkv_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "stablelm": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "rwkv": ["key", "value", "receptance", "output"],
    "rwkv7": ["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"],
}

# The names PEFT looks for, in this order, when "all-linear" must leave out a SEQ_CLS model's head
# (SEQ_CLS_HEAD_NAMES in peft/utils/constants.py).
SEQ_CLS_HEAD_NAMES = ("score", "classifier")

# Mixture-of-experts model types whose experts transformers 5 fuses into 3-D parameters. For these,
# PEFT 0.21.2 rewrites the config before matching (peft/utils/transformers_weight_conversion.py):
# expert and router names become ``target_parameters`` (LoRA on bare parameters, which minilora
# does not have), and ``None`` or a regex no longer mean what they say. minilora refuses those
# configs instead of choosing other layers. (transformers' _MODEL_TO_CONVERSION_PATTERN, the
# "mixtral" and "qwen2_moe" families; tests/test_targets.py checks it against the installed libraries.)
MOE_RENAMED_TARGETS = {
    "mixtral": ("gate", "w1", "w3", "w2"),
    "qwen2_moe": ("gate", "gate_proj", "up_proj", "down_proj"),
}
MOE_MODEL_TYPES = {
    "Dots3NoteTextModel": "qwen2_moe", "UnlimitedOcrTextModel": "qwen2_moe", "afmoe": "qwen2_moe",
    "beam": "qwen2_moe", "cohere2_moe": "qwen2_moe", "deepseek_v2": "qwen2_moe", "deepseek_v3": "qwen2_moe",
    "deepseek_v32": "qwen2_moe", "dots1": "qwen2_moe", "ernie4_5_moe": "qwen2_moe", "exaone_moe": "qwen2_moe",
    "flex_olmo": "qwen2_moe", "glm4_moe": "qwen2_moe", "glm4_moe_lite": "qwen2_moe", "glm4v_moe": "qwen2_moe",
    "glm_moe_dsa": "qwen2_moe", "hunyuan_v1_moe": "qwen2_moe", "longcat_flash": "qwen2_moe",
    "mellum": "qwen2_moe", "minimax": "mixtral", "minimax_m2": "mixtral", "mixtral": "mixtral",
    "olmoe": "qwen2_moe", "qwen3_moe": "qwen2_moe", "qwen3_next": "qwen2_moe", "qwen3_omni_moe": "qwen2_moe",
    "qwen3_omni_moe_text": "qwen2_moe", "qwen3_omni_moe_thinker": "qwen2_moe", "sarvam_mla": "qwen2_moe",
    "solar_open": "qwen2_moe",
}

LINEAR_TYPES = (nn.Linear, Conv1D)


def model_config(model: nn.Module) -> dict:
    """``model.config`` as a dict, read as PEFT's ``get_model_config`` reads it: from a transformers
    config, a dataclass or a plain dict (``{}`` for a model without one)."""
    config = getattr(model, "config", None)
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    elif dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    return config if isinstance(config, dict) else {}


def model_type(model: nn.Module) -> Optional[str]:
    """``model.config``'s ``model_type`` (``None`` for a model without one)."""
    return model_config(model).get("model_type")


# --------------------------------------------------------------------------------------------
# What the config's targets mean for this model
# --------------------------------------------------------------------------------------------
def resolve_target_modules(model: nn.Module, config: LoraConfig) -> list[str] | str:
    """The targets PEFT would match for ``config`` on ``model``: the config's own, the architecture's
    default for ``None``, or the full names of the linear layers for ``"all-linear"``.

    Raises:
        MiniLoraError: ``None`` for an architecture PEFT has no default for, or a config PEFT would
            rewrite into LoRA on expert parameters (see ``MOE_MODEL_TYPES``).
    """
    targets = config.target_modules
    _refuse_moe_rewrite(model, targets)
    if targets is None:
        kind = model_type(model)
        if kind in DEFAULT_TARGET_MODULES:
            return DEFAULT_TARGET_MODULES[kind]
        raise MiniLoraError(
            f"target_modules is None and PEFT has no default targets for model type {kind!r} (peft.get_peft_model "
            "raises 'Please specify `target_modules`' for it too). Name the layers, e.g. "
            f"LoraConfig(target_modules={suggest_targets(model)[:4]}), or use target_modules='all-linear' "
            "(every linear layer except the output layer)."
        )
    if is_all_linear(targets):
        targets = all_linear_names(model, getattr(config, "task_type", None))
    return condensed_targets(model, targets)


MIN_TARGET_MODULES_FOR_OPTIMIZATION = 20  # PEFT's threshold (peft/utils/constants.py)


def condensed_targets(model: nn.Module, targets: Any) -> Any:
    """PEFT's shortening of a long list of targets (20 names or more, e.g. "all-linear" on a deep
    model): the fewest name suffixes that still select exactly those modules and no other
    (``inject_adapter`` with ``_find_minimal_target_modules``). PEFT matches with the short list and
    writes it into the config and adapter_config.json, so minilora does too: it selects the same
    modules, but ``layers_to_transform`` now applies to them (it never does to a full name).

    Raises:
        MiniLoraError: for an empty name in a long list (PEFT raises a ValueError).
    """
    if isinstance(targets, str) or targets is None or len(targets) < MIN_TARGET_MODULES_FOR_OPTIMIZATION:
        return targets
    if "" in targets:
        raise MiniLoraError("target_modules should not contain an empty string (PEFT's words): remove '' from the "
                            "list.")
    suffixes = tuple(f".{target}" for target in targets)
    others = {name for name, _ in model.named_modules() if name not in targets and not name.endswith(suffixes)}
    shorter = minimal_target_modules(set(targets), others)
    return sorted(shorter) if len(shorter) < len(targets) else targets


def minimal_target_modules(targets: set[str], others: set[str]) -> set[str]:
    """PEFT's ``_find_minimal_target_modules``: for each target (in sorted order of its suffixes,
    shortest first) keep its shortest suffix that is no other module's suffix, unless a suffix kept
    already covers it. ``"model.layers.0.mlp.up_proj"`` -> ``"up_proj"`` when no other name ends so."""
    def name_suffixes(name: str) -> list[str]:  # "a.b.c" -> ["c", "b.c", "a.b.c"]
        parts = name.split(".")
        return [".".join(parts[i:]) for i in range(len(parts))][::-1]

    other_suffixes = {suffix for name in others for suffix in name_suffixes(name)}
    required: set[str] = set()
    for name, suffixes in sorted(((name, name_suffixes(name)) for name in targets), key=lambda item: item[1]):
        for suffix in suffixes:
            if suffix in required or suffix in other_suffixes:
                continue
            if not any(name.endswith(f".{kept}") for kept in required):
                required.add(suffix)
                break
    return required or set(targets)


def is_all_linear(targets: Any) -> bool:
    """PEFT's shorthand test: a string equal to "all-linear", in any case."""
    return isinstance(targets, str) and targets.lower() == ALL_LINEAR


def all_linear_names(model: nn.Module, task_type: Optional[str] = None) -> list[str]:
    """PEFT's ``"all-linear"``: the names of every nn.Linear / Conv1D, minus the output layer.

    The output layer is found only on a transformers ``PreTrainedModel``: the module that
    ``get_output_embeddings()`` returns (``lm_head``), or, when there is none and the task is
    SEQ_CLS, the model's ``score`` or ``classifier`` attribute. A plain ``nn.Module`` keeps all its
    linear layers, the last one included (so does a ViT classifier without a SEQ_CLS task).
    """
    from transformers import PreTrainedModel

    # a model that has LoRA layers already: each counts as the linear layer it wraps, its insides not at all
    inside_lora = tuple(f"{name}." for name, module in model.named_modules() if isinstance(module, LoraLinear))
    names = {name for name, module in model.named_modules()
             if isinstance(module, (*LINEAR_TYPES, LoraLinear)) and not name.startswith(inside_lora)}
    output_layer = None
    if isinstance(model, PreTrainedModel):
        output_layer = model.get_output_embeddings()
        if output_layer is None and getattr(task_type, "value", task_type) == "SEQ_CLS":
            output_layer = next((getattr(model, head) for head in SEQ_CLS_HEAD_NAMES
                                 if getattr(model, head, None) is not None), None)
    if output_layer is not None:
        # the first name under which the output layer appears (named_modules lists a module once)
        names.discard(next((name for name, module in model.named_modules() if module is output_layer), None))
    return sorted(names)


def _refuse_moe_rewrite(model: nn.Module, targets: Any) -> None:
    """Raise for the configs PEFT 0.21.2 rewrites on transformers-5 mixture-of-experts models."""
    family = MOE_MODEL_TYPES.get(model_type(model) or "")
    if family is None:
        return
    renamed = MOE_RENAMED_TARGETS[family]
    why = None
    if targets is None:
        why = ("PEFT turns target_modules=None into an empty set for these models and then finds no target "
               "(NoMatchingPeftModuleError)")
    elif isinstance(targets, str):
        why = ("PEFT resolves a string target (a regex or 'all-linear') into bare layer names here, so a regex "
               "for one layer targets that name in every layer, and 'all-linear' adds LoRA on the experts' "
               "fused parameters (target_parameters)")
    else:
        hit = [target for target in targets if any(target == old or target.endswith(f".{old}") for old in renamed)]
        if hit:
            why = (f"PEFT moves {sorted(hit)} from target_modules to target_parameters (LoRA on the experts' fused "
                   "3-D parameters), which minilora cannot do")
    if why:
        raise MiniLoraError(
            f"This {model_type(model)} model is a mixture of experts whose experts transformers 5 fuses into "
            f"3-D parameters: {why}. minilora refuses rather than adapt other layers. Pass a list of the "
            f"attention layers instead, e.g. target_modules=['q_proj', 'k_proj', 'v_proj', 'o_proj'] "
            f"(not {list(renamed)}), or use PEFT for the experts."
        )


# --------------------------------------------------------------------------------------------
# Matching one module name
# --------------------------------------------------------------------------------------------
def matches(name: str, patterns: list[str] | set[str] | str) -> bool:
    """PEFT's name rule: a regex string must match the full name; a list entry must equal the name or
    be its last dotted part(s) (``"c_attn"`` matches ``"transformer.h.0.attn.c_attn"``)."""
    if isinstance(patterns, str):
        return bounded_regex.fullmatch(patterns, name)
    return name in patterns or any(name.endswith(f".{pattern}") for pattern in patterns)


def is_saved_module(name: str, modules_to_save: Optional[list[str]]) -> bool:
    """True for a module inside (or equal to) one of ``modules_to_save``: those are never LoRA targets."""
    return any(bounded_regex.match(rf"(^|.*\.){module}($|\..*)", name) for module in modules_to_save or ())


def layer_index(name: str, layers_pattern: Optional[list[str] | str]) -> Optional[int]:
    """The block index in ``name`` as PEFT reads it: the first number after ``layers_pattern``
    (``"model.layers.3.mlp.up_proj"`` -> 3 with pattern "layers"), or without a pattern the first
    number that follows two name parts. ``None`` when there is none."""
    if not layers_pattern:
        match = bounded_regex.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        match = None
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            match = bounded_regex.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if match is not None:
                break
    return int(match.group("idx")) if match else None


def is_target(name: str, targets: list[str] | str, config: Optional[LoraConfig] = None) -> bool:
    """Does module ``name`` get LoRA? PEFT's ``check_target_module_exists``, step by step.

    ``targets`` are the resolved targets (``resolve_target_modules``); ``config`` supplies the
    narrowing selectors (exclude_modules, modules_to_save, layers_to_transform / layers_pattern).
    """
    exclude = getattr(config, "exclude_modules", None)
    if exclude and matches(name, exclude):
        return False
    if is_saved_module(name, getattr(config, "modules_to_save", None)):
        return False
    if isinstance(targets, str) or name in targets:
        return matches(name, targets)  # regex, or an exact name: layers_to_transform does not apply
    if not matches(name, targets):
        return False
    layers = getattr(config, "layers_to_transform", None)
    if layers is None or layers == []:
        return True
    index = layer_index(name, getattr(config, "layers_pattern", None))
    if index is None:
        return False
    return index == layers if isinstance(layers, int) else index in layers


# --------------------------------------------------------------------------------------------
# All targets of a model, checked
# --------------------------------------------------------------------------------------------
def find_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Names of the modules ``inject`` would wrap, in ``named_modules()`` order.

    Raises:
        MiniLoraError: if none match, or one is not linear, or the targets cannot be resolved.
    """
    targets = resolve_target_modules(model, config)
    error = bounded_regex.compile_error(targets) if isinstance(targets, str) else None
    if error:
        raise MiniLoraError(
            f"target_modules={bounded_regex.short(targets)} is a string, so it is read as a regex, and it is not a "
            f"valid one ({error}). Fix the regex, or pass a list of names such as {suggest_targets(model)[:3]}."
        )
    # a LoRA layer already there is a target as the layer it wraps (another adapter goes in it); its insides are not
    inside_lora = tuple(f"{name}." for name, module in model.named_modules() if isinstance(module, LoraLinear))
    with bounded_regex.time_bound():
        names = [name for name, _ in model.named_modules()
                 if name and not name.startswith(inside_lora) and is_target(name, targets, config)]
    if not names and isinstance(model, LINEAR_TYPES):
        raise MiniLoraError(
            f"The model is itself a single {type(model).__name__}; inject replaces layers inside a model. "
            "Put it in one (nn.Sequential(layer) with target_modules=['0']) or wrap it directly: "
            "minilora.LoraLinear(layer, r=8)."
        )
    if not names:
        raise MiniLoraError(_no_match_message(model, targets, config))
    # modules_to_save of an earlier adapter: its original and copies are trained in full, not adapted
    wrappers = tuple(f"{name}." for name, module in model.named_modules()
                     if hasattr(module, "original_module") and hasattr(module, "modules_to_save"))
    inside_saved = [name for name in names if name.startswith(wrappers)]
    if inside_saved:
        raise MiniLoraError(f"target_modules={targets!r} selects {inside_saved[0]!r}, inside a module that an adapter "
                            "trains in full (modules_to_save). PEFT puts LoRA into the module's original and into "
                            "its copies, and then cannot save the adapter (a KeyError). Leave it out, e.g. with "
                            "exclude_modules.")
    exclude = getattr(config, "exclude_modules", None)
    saved = getattr(config, "modules_to_save", None)  # (PEFT counts modules_to_save's modules as excluded too)
    if exclude and not any(matches(name, exclude) or is_saved_module(name, saved)
                           for name, _ in model.named_modules() if name):
        warnings.warn(f"You have passed exclude_modules={exclude} but no modules were excluded. "  # PEFT's words
                      "Please check that exclude_modules was set correctly.", stacklevel=3)
    modules = dict(model.named_modules())
    for name in names:
        if not isinstance(modules[name], (*LINEAR_TYPES, LoraLinear)):
            raise MiniLoraError(
                f"target {name!r} is a {type(modules[name]).__name__}; LoRA here wraps nn.Linear or Conv1D "
                f"only. Narrow target_modules (or add it to exclude_modules), e.g. to {suggest_targets(model)[:3]}."
            )
    return names


def _no_match_message(model: nn.Module, targets: list[str] | str, config: LoraConfig) -> str:
    """Why nothing matched: PEFT 0.21.2's sentence first (``BaseTuner.inject_adapter``, so a script or
    test that matches PEFT's words still does), then in the terms of the selector that removed everything.

    PEFT sorts the model's modules into *excluded* (by ``exclude_modules``, or inside a module of
    ``modules_to_save``) and *unmatched* (the rest): only excluded ones -> "All modules were excluded",
    only unmatched ones -> "Target modules ... not found", both -> "No modules were targeted"."""
    names = [name for name, _ in model.named_modules() if name]
    exclude = getattr(config, "exclude_modules", None)
    excluded = [name for name in names if (exclude and matches(name, exclude))
                or is_saved_module(name, getattr(config, "modules_to_save", None))]
    unmatched = len(names) > len(excluded)
    plain = [name for name in names if matches(name, targets)]
    shown = config.target_modules if is_all_linear(config.target_modules) else targets
    layers = getattr(config, "layers_to_transform", None)
    pattern = getattr(config, "layers_pattern", None)
    notes = (f" Note: You specified 'layers_to_transform': {layers}." if layers is not None else "") + \
        (f" You also specified 'layers_pattern': {pattern}." if pattern is not None else "")
    if excluded and not unmatched:
        peft_words = ("All modules were excluded. This is likely unintended. Check your `target_modules`, "
                      "`exclude_modules` and `modules_to_save` configuration.")
    elif not excluded:
        peft_words = (f"Target modules {shown} not found in the base model. Please check the target modules and "
                      f"try again.{notes}")
    else:
        peft_words = ("No modules were targeted for adaptation. This might be caused by a combination of mismatched "
                      "target modules and excluded modules. Please check your `target_modules` and `exclude_modules` "
                      "configuration. You may also have only targeted modules that are marked to be saved "
                      f"(`modules_to_save`).{notes}")
    if not plain:
        return (f"{peft_words} target_modules={shown!r} matches no module of this {type(model).__name__}. "
                f"Linear layers it has: {suggest_targets(model)[:12]}.")
    return (f"{peft_words} target_modules={shown!r} matches {len(plain)} modules (e.g. {plain[0]!r}), but "
            f"exclude_modules={exclude!r}, "
            f"layers_to_transform={layers!r} "
            f"(layers_pattern={pattern!r}) and "
            f"modules_to_save={getattr(config, 'modules_to_save', None)!r} leave none. Loosen one of them.")


def suggest_targets(model: nn.Module) -> list[str]:
    """The distinct last name parts of the model's linear layers, to suggest as targets; never the
    output layer (``lm_head``) or a classification head, which LoRA targets are not meant for."""
    keep = set(all_linear_names(model, "SEQ_CLS"))
    suffixes = []
    for name, module in model.named_modules():
        if name in keep and name.split(".")[-1] not in suffixes:
            suffixes.append(name.split(".")[-1])
    return suffixes


# --------------------------------------------------------------------------------------------
# Per-layer r and lora_alpha
# --------------------------------------------------------------------------------------------
def pattern_key(patterns: list[str], name: str) -> Optional[str]:
    """PEFT's ``get_pattern_key``: the first pattern (in the dict's order) that matches the end of
    ``name`` on a dot boundary, as a regex: ``(.*\\.)?(pattern)$``. ``None`` if none does."""
    for pattern in patterns:
        if bounded_regex.match(rf"(.*\.)?({pattern})$", name):
            return pattern
    return None


def layer_rank_and_alpha(name: str, config: LoraConfig) -> tuple[int, float]:
    """(r, lora_alpha) for layer ``name``: ``rank_pattern`` / ``alpha_pattern`` when one matches, else
    the config's ``r`` / ``lora_alpha``. The scaling is then ``alpha / r`` (``/ sqrt(r)`` with rsLoRA)."""
    rank_key = pattern_key(list(config.rank_pattern), name)
    alpha_key = pattern_key(list(config.alpha_pattern), name)
    r = config.rank_pattern[rank_key] if rank_key is not None else config.r
    alpha = config.alpha_pattern[alpha_key] if alpha_key is not None else config.lora_alpha
    return r, alpha
