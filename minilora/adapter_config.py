"""adapter_config.json: PEFT's config fields, read into a minilora LoraConfig and written from one.

PEFT writes every field of its ``LoraConfig`` (about forty in peft 0.21.2). minilora sorts them in three:

- the fields it uses (``r``, ``lora_alpha``, ``target_modules``, ...), with PEFT's names and meanings;
- fields that say where the adapter came from (``task_type``, ``base_model_name_or_path``, ...): ignored;
- PEFT features minilora does not have (DoRA, ``target_parameters``, ...): fine while
  unused, an error when used, since loading without them would compute something else.

Any other field (written by a newer PEFT) is ignored with one warning, as PEFT itself does.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from .config import LoraConfig, MiniLoraError
from .inject import lora_layers
from .targets import resolve_target_modules

CONFIG_NAME = "adapter_config.json"
# Read no more of a config file than this: PEFT's largest (every target module named) is a few MB
MAX_CONFIG_BYTES = 64 * 2**20

# The fields minilora uses, ...
HONOURED_FIELDS = ("r", "lora_alpha", "lora_dropout", "target_modules", "fan_in_fan_out", "bias", "use_rslora",
                   "init_lora_weights", "exclude_modules", "layers_to_transform", "layers_pattern", "rank_pattern",
                   "alpha_pattern", "modules_to_save", "lora_bias")
# (of which these belong to the adapter itself; lora_dropout is a training setting, and fan_in_fan_out
# is read from each layer's type)
ADAPTER_FIELDS = ("r", "lora_alpha", "target_modules", "bias", "use_rslora", "init_lora_weights", "exclude_modules",
                  "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern", "modules_to_save",
                  "lora_bias")
# The weights file records a digest of these (minilora/files.py): a config that is not the one the
# weights were saved with is refused.
DIGESTED_FIELDS = HONOURED_FIELDS
# ... the fields that say where the adapter came from, not what it computes (read and ignored; but
# ensure_weight_tying, which changes nothing minilora computes, gets PEFT's warnings or a refusal where
# the adapter would tie layers: compat_tying.py, called by adapters.load_adapter), ...
METADATA_FIELDS = ("peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode",
                   "auto_mapping", "peft_version", "megatron_core", "qalora_group_size", "ensure_weight_tying")
# Their types, checked even though minilora ignores their values: a file with "inference_mode": "false"
# is broken (PEFT would read the string as true), and a wrong type is the sign of a hand-made file.
METADATA_TYPES = {
    "task_type": (str, type(None)), "base_model_name_or_path": (str, type(None)), "revision": (str, type(None)),
    "inference_mode": (bool,), "auto_mapping": (dict, type(None)), "peft_version": (str, type(None)),
    "megatron_core": (str, type(None)), "fan_in_fan_out": (bool, type(None)),
    "qalora_group_size": (int, type(None)), "ensure_weight_tying": (bool,),
}
# PEFT's task types (peft.TaskType): any other task_type is an error in PEFT, so it is one here too.
TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
# ... and PEFT features minilora does not have. Each is fine while unused (None, False, {} or []);
# a used one would change what the adapter computes, so it is an error rather than a wrong answer.
UNSUPPORTED_FIELDS = {
    "use_dora": "DoRA (weight-decomposed LoRA)",
    "layer_replication": "replicated layers",
    "target_parameters": "LoRA on bare parameters",
    "trainable_token_indices": "trainable token embeddings",
    "loftq_config": "LoftQ initialisation",
    "megatron_config": "Megatron parallel layers",
    "use_qalora": "QA-LoRA",
    "eva_config": "EVA initialisation",
    "corda_config": "CorDA initialisation",
    "alora_invocation_tokens": "activated LoRA",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
    "lora_ga_config": "LoRA-GA",
    "monteclora_config": "MonteCLoRA",
    "use_bdlora": "BD-LoRA",
    "velora_config": "VeLoRA",
}


def config_fields(model: nn.Module, config: LoraConfig) -> dict[str, Any]:
    """adapter_config.json for ``config``, in PEFT's field names, as ``LoraConfig.save_pretrained`` writes it."""
    layers = [layer for _, layer in lora_layers(model)]
    targets = resolve_target_modules(model, config)
    task_type = getattr(config, "task_type", None)
    task_type = getattr(task_type, "value", task_type)  # a TaskType enum member -> its string
    fields = {
        "peft_type": "LORA",
        "task_type": task_type,
        # Without a task type, PEFT records the model class so that AutoPeftModel can rebuild it.
        "auto_mapping": None if task_type else {"base_model_class": type(model).__name__,
                                                "parent_library": type(model).__module__},
        "base_model_name_or_path": getattr(config, "base_model_name_or_path", None)
        or getattr(model, "name_or_path", None) or None,
        "revision": getattr(config, "revision", None),
        "inference_mode": True,
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "target_modules": targets if isinstance(targets, str) else sorted(targets),
        # True for GPT-2's Conv1D (its weight is (in, out)): the config's, which injecting set to the last new
        # layer's layout as PEFT does; minilora's None (each layer's own) writes the first layer's
        "fan_in_fan_out": layers[0].fan_in_fan_out if config.fan_in_fan_out is None else config.fan_in_fan_out,
        "bias": config.bias,
        "init_lora_weights": config.init_lora_weights,
        # PEFT's selectors and modules_to_save. Only fields that PEFT has had since 0.6 are written
        # always: releases 0.6 to 0.12 refuse a config.json with a field they do not know
        # (docs/peft-versions.md), so a newer field such as use_dora would lock them out.
        "modules_to_save": config.modules_to_save,
        "layers_to_transform": config.layers_to_transform,
        "layers_pattern": config.layers_pattern,
        "rank_pattern": dict(config.rank_pattern),
        "alpha_pattern": dict(config.alpha_pattern),
    }
    if config.use_rslora:  # added in PEFT 0.7; a release that cannot honour it should refuse the file
        fields["use_rslora"] = True
    if config.exclude_modules is not None:  # added in PEFT 0.14: written only when used, for the same reason
        exclude = config.exclude_modules  # (a regex string, or names: compat's config keeps them as a set, as PEFT)
        fields["exclude_modules"] = exclude if isinstance(exclude, str) else sorted(exclude)
    if config.lora_bias:  # added in PEFT 0.14 too
        fields["lora_bias"] = True
    return fields


def config_text(fields: Mapping[str, Any]) -> str:
    """The text of adapter_config.json: sorted keys, two-space indent, as PEFT writes it."""
    return json.dumps(fields, indent=2, sort_keys=True) + "\n"


class MissingKeysError(MiniLoraError, TypeError):
    """A config file without ``peft_type`` (PEFT raises a TypeError for it, so this is one too)."""


def config_from_fields(fields: Mapping[str, Any], source: str) -> LoraConfig:
    """A minilora LoraConfig from PEFT's config fields (adapter_config.json or a peft.LoraConfig).

    Unknown fields (from a newer PEFT) are ignored with one warning, as PEFT does; fields for
    features minilora does not have are an error when used.

    Raises:
        MiniLoraError: naming ``source``, for another PEFT method, a used unsupported feature, or a bad value.
    """
    if "peft_type" not in fields:  # not a PEFT config at all (PEFT raises a TypeError here, in these words)
        raise MissingKeysError(f"{source}: The LoraConfig config that is trying to be loaded is missing required "
                               "keys: {'peft_type'}. It is not a PEFT adapter config (PEFT's files say "
                               "\"peft_type\": \"LORA\").")
    peft_type = getattr(fields.get("peft_type"), "value", fields.get("peft_type"))
    if peft_type != "LORA":
        raise MiniLoraError(f"{source}: peft_type is {peft_type!r}; minilora reads LoRA adapters only "
                            "(peft_type \"LORA\").")
    check_unsupported(fields, source)
    for name, types in METADATA_TYPES.items():
        if name in fields and not isinstance(fields[name], types):
            wanted = " or ".join("null" if t is type(None) else {"str": "a string", "bool": "true/false",
                                 "dict": "an object", "int": "an integer"}[t.__name__] for t in types)
            raise MiniLoraError(f"{source}: {name} must be {wanted}, got {fields[name]!r}. The file is not one "
                                "PEFT or minilora wrote: save the adapter again.")
    task_type = getattr(fields.get("task_type"), "value", fields.get("task_type"))
    if task_type is not None and task_type not in TASK_TYPES:  # (PEFT's ValueError, in its words)
        raise MiniLoraError(f"{source}: Invalid task type: {task_type!r}. Must be one of the following task types: "
                            f"{', '.join(TASK_TYPES)}. Fix task_type in the file, or set it to null.")
    unknown = sorted(set(fields) - set(HONOURED_FIELDS) - set(METADATA_FIELDS) - set(UNSUPPORTED_FIELDS))
    if unknown:
        warnings.warn(f"{source}: ignoring fields minilora does not know: {unknown}. They were probably written "
                      "by a newer PEFT.", stacklevel=3)
    init = fields.get("init_lora_weights", True)
    if init not in (True, False, "gaussian"):
        raise MiniLoraError(
            f"{source}: init_lora_weights={init!r}. minilora knows True, False and 'gaussian'; initialisations "
            "such as 'pissa', 'olora' or 'corda' also change the base weights, which minilora cannot reproduce. "
            "Convert the adapter to plain LoRA in PEFT (save_pretrained(..., "
            "path_initial_model_for_weight_conversion=...)) first."
        )
    values = {name: fields[name] for name in HONOURED_FIELDS if name in fields}
    values["fan_in_fan_out"] = None  # minilora reads each layer's layout from its type
    try:
        return LoraConfig(**values)
    except (TypeError, ValueError, OverflowError) as error:  # MiniLoraError is a ValueError
        raise MiniLoraError(f"{source}: {error}") from None


def check_unsupported(fields: Mapping[str, Any], source: str) -> None:
    """Raise if any PEFT feature minilora does not have is used (set to something but None/False/{}/[])."""
    used = {name: fields[name] for name in UNSUPPORTED_FIELDS if name in fields and not _unused(fields[name])}
    if used:
        features = ", ".join(f"{name}={value!r} ({UNSUPPORTED_FIELDS[name]})" for name, value in used.items())
        raise MiniLoraError(f"{source}: minilora cannot honour {features}. Going on without it would give "
                            "different outputs. Use PEFT for this adapter, or train one without these options.")


def read_adapter_config(directory: Path) -> LoraConfig:
    """Parse and check ``directory/adapter_config.json``."""
    return config_from_fields(read_config_fields(directory), str(directory / CONFIG_NAME))


def read_config_fields(directory: Path) -> dict[str, Any]:
    """The fields of ``directory/adapter_config.json``, as JSON gives them (checked by config_from_fields)."""
    path = directory / CONFIG_NAME
    if not path.exists() and path.is_symlink():
        raise MiniLoraError(f"{path} is a symlink that leads nowhere (to {os.readlink(path)!r}: missing, or a loop of "
                            "links). Replace it by the adapter's config file, or save the adapter again.")
    if not path.exists():
        raise MiniLoraError(f"{path} is missing. An adapter directory holds {CONFIG_NAME} and the weights, "
                            "as minilora.save_adapter and PEFT's save_pretrained write them.")
    return read_json_fields(path)


def check_regular_file(path: Path) -> None:
    """Raise MiniLoraError unless ``path`` (followed if a symlink) is a regular file: a directory, a
    device such as /dev/zero or a FIFO in its place would fail later in an obscure way, or never end."""
    if path.is_dir():
        raise MiniLoraError(f"{path} is a directory, not a file. Save the adapter again.")
    if not path.is_file():
        raise MiniLoraError(f"{path} is not a regular file (a device, a FIFO or a socket), so it is not one an "
                            "adapter save wrote. Save the adapter again.")


def _read_at_most(file: Any, limit: int, chunk: int = 2**20) -> bytes:
    """Up to ``limit`` bytes of ``file``, read a megabyte at a time: ``file.read(limit)`` would set aside
    ``limit`` bytes (64 MiB) for every config, however small."""
    chunks, size = [], 0
    while size < limit and (data := file.read(min(chunk, limit - size))):
        chunks.append(data)
        size += len(data)
    return b"".join(chunks)


def read_json_fields(path: Path) -> dict[str, Any]:
    """The JSON object in the file ``path`` (MiniLoraError if it cannot be read or is not an object)."""
    if path.exists():
        check_regular_file(path)
    try:
        with open(path, "rb") as file:
            data = _read_at_most(file, MAX_CONFIG_BYTES + 1)  # (bounded: a file that is huge, or grows while read)
    except OSError as error:
        raise MiniLoraError(f"{path} could not be read ({error}).") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise MiniLoraError(f"{path} holds more than {MAX_CONFIG_BYTES // 2**20} MiB, more than any config PEFT "
                            "writes (a few MB at most, every target module named), so it is not one: minilora reads "
                            f"at most {MAX_CONFIG_BYTES // 2**20} MiB. Save the adapter again.")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise MiniLoraError(f"{path} is not valid JSON ({error}): the file is corrupt. Save the adapter again.") \
            from None
    try:
        fields = json.loads(text)
    except json.JSONDecodeError as error:
        raise MiniLoraError(f"{path} is not valid JSON ({error}): the file is corrupt. Save the adapter again.") \
            from None
    except RecursionError:
        raise MiniLoraError(f"{path} nests JSON values too deeply to read: it is not an adapter config. "
                            "Save the adapter again.") from None
    except ValueError as error:  # an integer of more than 4300 digits (sys.get_int_max_str_digits)
        raise MiniLoraError(f"{path} could not be read as JSON ({error}): it is not an adapter config. "
                            "Save the adapter again.") from None
    if not isinstance(fields, dict):
        kind = {"NoneType": "null", "str": "string", "int": "number", "float": "number", "bool": "true/false"}.get(
            type(fields).__name__, type(fields).__name__)
        raise MiniLoraError(f"{path} holds a JSON {kind}, not an object of config fields: "
                            "the file is corrupt. Save the adapter again.")
    return fields


def _unused(value: object) -> bool:
    """PEFT's "feature not used" values: None, False, an empty dict or list."""
    return value is None or value is False or (isinstance(value, (dict, list)) and not value)
