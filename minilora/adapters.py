"""Adapters on disk in PEFT's format: ``save_adapter`` and ``load_adapter``.

An adapter directory holds what ``peft.PeftModel.save_pretrained`` writes, so either library reads
the other's files:

    adapter_config.json          the LoraConfig, with PEFT's field names (see adapter_config.py)
    adapter_model.safetensors    A and B of every wrapped layer, under PEFT's keys:
        base_model.model.<layer>.lora_A.weight    (r, in)
        base_model.model.<layer>.lora_B.weight    (out, r)

In memory the same tensors are ``<layer>.lora_A.<adapter>.weight`` (PEFT's in-memory names too); a
file holds one adapter, so its keys drop the adapter's name, as PEFT's files do.

Older PEFT releases wrote ``adapter_model.bin`` (a ``torch.save`` pickle) instead; ``load_adapter``
reads it too. W0 is not in the files: it comes from the base model the adapter is loaded into, and
``h = W0 x + scaling * B A x`` needs only ``A``, ``B`` and ``scaling = lora_alpha / r``.

Loading is strict, as torchtune's is: every check (files, JSON, fields, keys, shapes, values) runs
before the model is touched, and any failure raises MiniLoraError with the model left as it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import re
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .adapter_config import (ADAPTER_FIELDS, CONFIG_NAME, DIGESTED_FIELDS, check_regular_file, config_fields,
                             config_from_fields, config_text, read_config_fields)
from .bounded_regex import time_bound
from .compat_tying import check_saved_tying
from .config import LoraConfig, MiniLoraError
from .files import (commit, config_for_weights, discard, remove_abandoned_temporaries, remove_atomically, stage,
                    weights_metadata, write_error_hint)
from .inject import (DEFAULT_ADAPTER, adapter_config, inject, is_lora_parameter, lora_layers,
                     mark_only_lora_as_trainable, set_adapter_config)
from .layer import HALF_DTYPES, LoraLinear, check_autocast_adapter_dtype, in_out_features
from .multi import add_adapter, check_can_add
from .saved_modules import (BIAS_ALL_COPY, BIAS_ALL_ORIGINAL, bias_all_keys, copy_part, expected_saved_shapes,
                            find_modules_to_save, is_saved_module_key, original_key, saved_modules, saved_state,
                            to_model_keys)
from .targets import find_targets, is_target, layer_rank_and_alpha, resolve_target_modules

WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."  # PEFT's wrappers put this in front of every key

PAIRS_HINT = (
    "Use one of the two consistent pairs:\n"
    "  minilora.save_adapter(model, directory)    ->  minilora.load_adapter(base_model, directory)"
    "   (only A and B, in PEFT's format)\n"
    "  torch.save(model.state_dict(), path)       ->  model.load_state_dict(torch.load(path))"
    "          (every weight of the model)"
)


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------
def adapter_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor] | None = None,
                       adapter_name: str = DEFAULT_ADAPTER) -> dict[str, torch.Tensor]:
    """The tensors an adapter file holds, under PEFT's keys: A and B of every LoRA layer, plus the
    biases when the config trains them (``bias="all"``: every bias; ``"lora_only"``: the wrapped layers').

    Args:
        state_dict: take the values from here instead of ``model.state_dict()`` (``transformers.Trainer``
            passes one); the keys are minilora's, i.e. the model's own.
        adapter_name: which adapter; its name is left out of the keys, as in PEFT's files.
    """
    config = _saved_config(model, adapter_name)
    state = model.state_dict() if state_dict is None else state_dict
    adapter = adapter_name
    lora = {name: file_key(name, adapter) for name in state if is_lora_parameter(name) and f".{adapter}." in name}
    if config.bias == "all":  # (the biases of modules_to_save are in their copies, below)
        lora.update({name: name for name in state
                     if (name == "bias" or name.endswith(".bias")) and not is_saved_module_key(name)
                     and not is_lora_parameter(name)})  # (lora_B's own bias is in ``lora`` already)
        holding = [name for name, wrapper in saved_modules(model) if adapter in wrapper.modules_to_save]
        for key in bias_all_keys(model, holding):  # PEFT's extra keys (saved_modules.py)
            module = key.removesuffix(f".{BIAS_ALL_ORIGINAL}")
            lora[key] = key
            lora[f"{module}{copy_part(adapter)}bias"] = f"{module}.{BIAS_ALL_COPY}"
    elif config.bias == "lora_only":
        lora.update({f"{layer}.base_layer.bias": f"{layer}.base_layer.bias" for layer, _ in lora_layers(model)
                     if f"{layer}.base_layer.bias" in state})
    tensors = {PEFT_PREFIX + key: state[name] for name, key in lora.items()}
    saved = saved_state(model, state, adapter_name)  # modules_to_save: this adapter's copies
    tensors.update({PEFT_PREFIX + key: value for key, value in saved.items()})
    return tensors


def file_key(name: str, adapter: str) -> str:
    """The model's key -> the file's: ``h.0.attn.c_attn.lora_A.default.weight`` -> ``h.0.attn.c_attn.lora_A.weight``."""
    return name.replace(f".lora_A.{adapter}.", ".lora_A.").replace(f".lora_B.{adapter}.", ".lora_B.")


def save_adapter(model: nn.Module, directory: str | os.PathLike, safe_serialization: bool = True,
                 state_dict: Mapping[str, torch.Tensor] | None = None, adapter_name: str = DEFAULT_ADAPTER) -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``directory``, as PEFT does.

    ``peft.PeftModel.from_pretrained(base, directory)`` loads the result without warnings and gives
    this model's outputs; so does ``minilora.load_adapter(base, directory)``.

    Args:
        model: a model with minilora layers (from ``inject`` or ``load_adapter``).
        directory: created if needed. A stale weights file of the other format is removed, so that
            readers (which prefer safetensors) always find the one just written. Each file is replaced
            in one step and the weights record a digest of the config (minilora/files.py): after a
            crash at any instant, or with several processes saving at once, ``load_adapter`` finds
            one whole save or raises MiniLoraError, never the weights of one save with another's config.
        safe_serialization: False writes the older ``adapter_model.bin`` (a ``torch.save`` pickle).
        state_dict: see ``adapter_state_dict``.
        adapter_name: which adapter of the model to save (minilora.save_adapters writes several).

    Raises:
        MiniLoraError: if the model has no minilora layers, its layers no longer agree with its config,
            or the directory cannot be written.
    """
    config = _saved_config(model, adapter_name)
    # A copy of each tensor, not a view: on the fused path lora_A is a view into [W0; A], and
    # torch.save would write the whole buffer that a view points into.
    taken = adapter_state_dict(model, state_dict, adapter_name)
    check_not_sharded(taken)
    tensors = {key: value.detach().clone(memory_format=torch.contiguous_format) for key, value in taken.items()}
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise MiniLoraError(f"{directory} is a file; save_adapter writes a directory. Pick another path.")
    in_the_way = [name for name in (WEIGHTS_NAME, LEGACY_WEIGHTS_NAME, CONFIG_NAME)
                  if (directory / name).is_dir() and not (directory / name).is_symlink()]
    if in_the_way:  # (a rename cannot replace a folder: found now, not after the weights are written)
        raise MiniLoraError(f"{directory / in_the_way[0]} is a folder, where save_adapter writes a file. Remove it, "
                            "or save elsewhere.")
    fields = config_fields(model, config)
    text = config_text(fields)
    # Binds the weights to this config, and says which config they replace (minilora/files.py)
    metadata = weights_metadata(fields, text, _config_in(directory), DIGESTED_FIELDS)
    if safe_serialization:
        from safetensors.torch import save
        data = save(tensors, metadata={"format": "pt", **metadata})
    else:
        ordered = OrderedDict(tensors)
        ordered._metadata = metadata  # type: ignore[attr-defined]  # torch.load keeps it
        buffer = io.BytesIO()
        torch.save(ordered, buffer)
        data = buffer.getvalue()
    staged, created = [], not directory.exists()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        remove_abandoned_temporaries(directory)
        # Both files are written out first (a full disk changes nothing), then renamed: weights first,
        # config second (files.py). Readers prefer safetensors: a .bin is in place before the old
        # safetensors file goes (until then readers find the old pair), a safetensors file before the old .bin goes.
        weights = directory / (WEIGHTS_NAME if safe_serialization else LEGACY_WEIGHTS_NAME)
        staged.append(stage(weights, data))
        staged.append(stage(directory / CONFIG_NAME, text.encode("utf-8")))
        commit(staged[0], weights)
        if not safe_serialization:
            remove_atomically(directory / WEIGHTS_NAME)
        commit(staged[1], directory / CONFIG_NAME)
        if safe_serialization:
            remove_atomically(directory / LEGACY_WEIGHTS_NAME)
    except BaseException as error:
        discard(staged)
        if created:
            with contextlib.suppress(OSError):
                directory.rmdir()  # (only if still empty)
        if isinstance(error, OSError):
            raise MiniLoraError(f"Could not write the adapter to {directory}: {error}. {write_error_hint(error)}") \
                from error
        raise


def _config_in(directory: Path) -> dict | None:
    """The config fields in ``directory/adapter_config.json`` now, or None (none there, or unreadable)."""
    try:
        return read_config_fields(directory) if directory.is_dir() else None
    except MiniLoraError:
        return None


def check_not_sharded(tensors: Mapping[str, torch.Tensor]) -> None:
    """Refuse the shards of a sharded model (FSDP2's ``fully_shard`` makes every parameter a DTensor
    that holds one rank's piece): an adapter file holds whole tensors."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch without torch.distributed
        return
    sharded = [key for key, value in tensors.items() if isinstance(value, DTensor)]
    if sharded:
        raise MiniLoraError(
            f"The model is sharded (e.g. FSDP2's fully_shard): {_few(sharded)} are DTensor shards, not whole "
            "tensors. Gather a full state dict on every rank and save it from one:\n"
            "  from torch.distributed.checkpoint.state_dict import get_model_state_dict, StateDictOptions\n"
            "  state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))\n"
            "  if rank == 0: minilora.save_adapter(model, directory, state_dict=state)"
        )


def _saved_config(model: nn.Module, adapter_name: str = DEFAULT_ADAPTER) -> LoraConfig:
    """The config ``inject`` left on the model for ``adapter_name``, after checking that every layer
    holding that adapter still agrees with it."""
    layers = list(lora_layers(model)) if isinstance(model, nn.Module) else []
    config = adapter_config(model, adapter_name) if layers else None
    if not layers or config is None:
        raise MiniLoraError(
            f"save_adapter needs a model with minilora layers and the config of adapter {adapter_name!r}, as "
            "minilora.inject(model, config) or minilora.load_adapter(model, directory) leave it. This model has none "
            f"({type(model).__name__}, {len(layers)} LoRA layers)."
        )
    try:
        config.validate()  # its fields may have been changed since inject
        selected = _selected_layers(model, config, [name for name, _ in layers])
    except MiniLoraError as error:
        raise MiniLoraError(f"The model's config was changed after inject and is no longer valid: {error}") from None
    holding = [name for name, layer in layers if adapter_name in layer.lora_A]  # (other adapters may have others)
    if selected != holding:
        raise MiniLoraError(
            f"The model's config.target_modules ({config.target_modules!r}) now selects {_few(selected)}, but the "
            f"model's LoRA layers are {_few(holding)}: the saved adapter could not be loaded "
            "back. target_modules was changed after inject; set it back, or inject again with the new targets."
        )
    for name, layer in layers:
        if adapter_name not in layer.lora_A:
            continue
        r, alpha = layer_rank_and_alpha(name, config)  # rank_pattern / alpha_pattern, else r / lora_alpha
        scaling = alpha / (math.sqrt(r) if config.use_rslora else r)
        layer_r, layer_scaling = layer.r[adapter_name], layer.scaling[adapter_name]
        if layer_r != r or abs(layer_scaling - scaling) > 1e-12 * abs(scaling):
            raise MiniLoraError(
                f"Layer {name!r} has r={layer_r}, scaling={layer_scaling:g} but the model's config says "
                f"r={r}, scaling={scaling:g} for it. PEFT's format holds r and lora_alpha (and rank_pattern / "
                "alpha_pattern) in the config; rebuild the adapter with one config."
            )
    return config


def _selected_layers(model: nn.Module, config: LoraConfig, layer_names: list[str]) -> list[str]:
    """The modules the config's targets select in a model that is already injected: the LoRA layers
    stand where their base layers stood, and modules inside a LoRA layer do not count."""
    inside = tuple(f"{name}." for name in layer_names)
    targets = resolve_target_modules(model, config)
    with time_bound():
        return [name for name, _ in model.named_modules()
                if name and not name.startswith(inside) and is_target(name, targets, config)]


# --------------------------------------------------------------------------------------------
# Reading and checking (nothing here changes a model)
# --------------------------------------------------------------------------------------------
def read_adapter_weights(directory: Path, device: torch.device) -> tuple[Path, dict[str, torch.Tensor], dict | None]:
    """(path, tensors, metadata or None) from ``adapter_model.safetensors``, or else the older
    ``adapter_model.bin``. The file is read once, so its tensors and metadata are from one version of it."""
    path = _weights_path(directory)
    try:
        data = path.read_bytes()
        if path.name == WEIGHTS_NAME:
            from safetensors.torch import load
            tensors, metadata = load(data), _safetensors_metadata(data)
        else:
            tensors = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)  # never runs pickled code
            metadata = getattr(tensors, "_metadata", None)
        if isinstance(tensors, dict):
            tensors = {key: value.to(device) if isinstance(value, torch.Tensor) else value
                       for key, value in tensors.items()}
    except Exception as error:  # a corrupt file can fail in many ways inside either reader
        raise MiniLoraError(f"{path} could not be read ({type(error).__name__}: {error}). The file is truncated "
                            "or corrupt: save the adapter again.") from None
    if not isinstance(tensors, dict):
        raise MiniLoraError(f"{path} does not hold a dict of named tensors ({type(tensors).__name__}). "
                            f"{PAIRS_HINT}")
    return path, tensors, metadata if isinstance(metadata, dict) else None


def _weights_path(directory: Path) -> Path:
    """``adapter_model.safetensors`` if there is one, else ``adapter_model.bin`` (as PEFT prefers them)."""
    path = directory / WEIGHTS_NAME
    if not path.exists():
        path = directory / LEGACY_WEIGHTS_NAME
    if not path.exists():
        raise MiniLoraError(f"{directory} has no {WEIGHTS_NAME} (nor the older {LEGACY_WEIGHTS_NAME}): the "
                            "adapter's weights are missing. Save the adapter again.")
    check_regular_file(path)
    return path


def paired_config_fields(directory: Path, file_fields: dict, weights_path: Path,
                         metadata: dict | None) -> tuple[dict, str, bool]:
    """(the config fields to read the weights with, where they are from, whether they are the weights'
    own): adapter_config.json's, or, where a save stopped between writing the weights and the config,
    the config the weights carry (minilora/files.py). Not the weights' own: ``load_adapter`` refuses."""
    fields = config_for_weights(file_fields, metadata, DIGESTED_FIELDS)
    if fields is None:
        return file_fields, str(directory / CONFIG_NAME), False
    if fields is file_fields:
        return fields, str(directory / CONFIG_NAME), True
    return fields, (f"{weights_path} (the config saved in it: the save that wrote it had not yet replaced "
                    f"{CONFIG_NAME})"), True


@dataclasses.dataclass(frozen=True)
class AdapterFiles:
    """An adapter directory read once: the config fields its weights are read with, and its tensors.
    A reader that needs the config before loading (minilora.compat) reads this, then passes it to
    ``load_adapter``, so that both see one version of the files even while another process saves."""

    directory: Path
    fields: dict
    config_origin: str  # where the fields are from (adapter_config.json, or the weights: paired_config_fields)
    paired: bool  # the fields are the weights' own (else load_adapter refuses the pair)
    weights_path: Path
    tensors: dict


def read_adapter_files(directory: Path, device: torch.device) -> AdapterFiles:
    """Read ``directory`` (adapter_config.json and the weights, each once); the tensors go to ``device``."""
    file_fields = read_config_fields(directory)
    path, tensors, metadata = read_adapter_weights(directory, device)
    fields, origin, paired = paired_config_fields(directory, file_fields, path, metadata)
    return AdapterFiles(directory, fields, origin, paired, path, tensors)


def read_saved_config_fields(directory: Path) -> tuple[dict, str]:
    """(fields, where they are from): the config ``load_adapter`` reads the adapter in ``directory`` with
    (see ``paired_config_fields``), for readers that need the config before loading (minilora.compat).
    Reads the weights' metadata only where it can (a safetensors header)."""
    file_fields = read_config_fields(directory)
    path = _weights_path(directory)
    if path.name == WEIGHTS_NAME:
        try:
            from safetensors import safe_open
            with safe_open(path, "pt") as file:
                metadata = file.metadata()
        except Exception as error:
            raise MiniLoraError(f"{path} could not be read ({type(error).__name__}: {error}). The file is truncated "
                                "or corrupt: save the adapter again.") from None
    else:
        metadata = read_adapter_weights(directory, torch.device("cpu"))[2]
    fields, origin, _ = paired_config_fields(directory, file_fields, path, metadata)
    return fields, origin


def _safetensors_metadata(data: bytes) -> dict | None:
    """The ``__metadata__`` of a safetensors file: an 8-byte little-endian header size, then a JSON header."""
    size = int.from_bytes(data[:8], "little")
    metadata = json.loads(data[8:8 + size]).get("__metadata__")
    return metadata if isinstance(metadata, dict) else None


def refuse_unpaired_config(config_path: Path, weights_path: Path) -> None:
    """The weights carry a digest (minilora wrote them) that is neither the config file's nor that of the
    config their save replaced (minilora/files.py)."""
    raise MiniLoraError(
        f"{config_path} is not the config {weights_path.name} was saved with (its fields "
        f"{', '.join(DIGESTED_FIELDS)} differ): the two files come from different saves, e.g. two processes "
        "saving into one directory at once, or the config was edited by hand. Nothing was loaded. "
        "Save the adapter again (a config edited by hand: load the weights with the original config, "
        "change the model, and save it again)."
    )


def minilora_key(key: str, adapter: str = "default") -> str:
    """A file's (or PEFT's in-memory) key -> the model's own: drop ``base_model.model.`` and put
    ``adapter`` after lora_A / lora_B, in place of the name there was (if any).

    ``base_model.model.h.0.attn.c_attn.lora_A.weight`` -> ``h.0.attn.c_attn.lora_A.default.weight``.
    """
    key = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
    return re.sub(r"\.(lora_[AB])(\.[^.]+)?\.(weight|bias)$", rf".\1.{adapter}.\3", key)  # (bias: lora_bias)


def check_file_keys(tensors: Mapping[str, torch.Tensor], adapter_name: str, origin: str, from_file: bool) -> None:
    """Keys that PEFT would not load into adapter ``adapter_name``, refused rather than loaded differently:

    - in a file, a key without ``base_model.model.`` (PEFT's files have it on every key; PEFT reports
      the others as unexpected and leaves the adapter's layers as they were initialised);
    - a key that names another adapter, ``<layer>.lora_A.other.weight``: PEFT's loader inserts the name
      only into keys without one, so it ignores the key, or writes it into the adapter ``other``.
    """
    if from_file:
        bare = [key for key in tensors if not key.startswith(PEFT_PREFIX)]
        if bare:
            raise MiniLoraError(f"{origin}: keys {_few(sorted(bare))} do not start with {PEFT_PREFIX!r}, as every key "
                                "in PEFT's adapter files does (PEFT would not load them). The file was not written "
                                "by PEFT's save_pretrained or minilora.save_adapter: save the adapter again.")
    for key in tensors:
        named = re.search(r"\.lora_[AB]\.([^.]+)\.(weight|bias)$", key)
        if named and named.group(1) != adapter_name:
            raise MiniLoraError(f"{origin}: key {key!r} names the adapter {named.group(1)!r}, but it is being loaded "
                                f"as {adapter_name!r}; PEFT would not load it into {adapter_name!r}. Adapter files "
                                "hold no adapter name (<layer>.lora_A.weight): save the adapter again with "
                                "save_adapter / save_pretrained, or load it with adapter_name="
                                f"{named.group(1)!r}.")


def expected_shapes(model: nn.Module, config: LoraConfig | None,
                    adapter_name: str = DEFAULT_ADAPTER) -> dict[str, tuple[int, ...]]:
    """Every tensor the adapter must hold for this model, by the model's key after loading, with its shape.

    A model whose minilora layers hold ``adapter_name`` expects A (r, in) and B (out, r) of exactly
    those layers; otherwise the targets of ``config`` are expected, as ``inject`` / ``add_adapter``
    will build them.
    """
    layers = {name: layer for name, layer in lora_layers(model) if adapter_name in layer.lora_A}
    adapter = adapter_name
    if layers:
        sizes = {name: (layer.in_features, layer.out_features, layer.r[adapter]) for name, layer in layers.items()}
    else:
        sizes = {name: (*_in_out(model.get_submodule(name)), layer_rank_and_alpha(name, config)[0])
                 for name in find_targets(model, config)}
    shapes = expected_saved_shapes(model, saved_module_names(model, config, list(sizes), adapter), adapter)
    lora_bias = layers[next(iter(layers))].lora_bias[adapter] if layers else getattr(config, "lora_bias", False)
    for name, (fan_in, fan_out, r) in sizes.items():
        shapes[f"{name}.lora_A.{adapter}.weight"] = (r, fan_in)
        shapes[f"{name}.lora_B.{adapter}.weight"] = (fan_out, r)
        if lora_bias:
            shapes[f"{name}.lora_B.{adapter}.bias"] = (fan_out,)
    bias = config.bias if config is not None else "none"
    if bias != "none":
        saved_names = saved_module_names(model, config, list(sizes), adapter)
        state = model.state_dict()
        for key in bias_all_keys(model, saved_names) if bias == "all" else []:  # PEFT's extra keys (saved_modules.py)
            shapes[key] = tuple(state[key if key in state else original_key(key)].shape)  # (wrapped or not yet)
        for key, value in model.state_dict().items():
            module_name, _, last = key.rpartition(".")
            if last != "bias" or is_saved_module_key(key) or module_name in saved_names:
                continue
            if module_name in sizes and not layers:
                key = f"{module_name}.base_layer.bias"  # where the bias will be once the layer is wrapped
            if bias == "all" or key.removesuffix(".base_layer.bias") in sizes:
                shapes[key] = tuple(value.shape)
    return shapes


def _in_out(module: nn.Module) -> tuple[int, int]:
    """(in, out) of a plain linear layer or of the one a LoraLinear wraps."""
    return (module.in_features, module.out_features) if isinstance(module, LoraLinear) else in_out_features(module)


def saved_module_names(model: nn.Module, config: LoraConfig | None, lora_targets: list[str],
                       adapter_name: str = DEFAULT_ADAPTER) -> list[str]:
    """The modules_to_save of adapter ``adapter_name``: the modules holding its copies if the model has
    the adapter already, else those its config selects (wrapped by another adapter or not yet)."""
    holding = [name for name, wrapper in saved_modules(model) if adapter_name in wrapper.modules_to_save]
    if holding or any(adapter_name in layer.lora_A for _, layer in lora_layers(model)):
        return holding
    return find_modules_to_save(model, getattr(config, "modules_to_save", None), lora_targets)


def check_config_selects_the_layers(model: nn.Module, config: LoraConfig, adapter_name: str) -> None:
    """Loading into existing layers: the file's config becomes the model's, so it must select exactly
    the layers that hold the adapter (else the model would carry a config that does not describe it, and
    a file saved from it would not load back)."""
    holding = [name for name, layer in lora_layers(model) if adapter_name in layer.lora_A]
    selected = find_targets(model, config)  # (a LoRA layer is a target as the layer it wraps)
    if selected != holding:
        raise MiniLoraError(f"its targets (target_modules={config.target_modules!r}, layers_to_transform="
                            f"{config.layers_to_transform!r}, ...) select {_few(selected)} in this model, but the "
                            f"layers that hold adapter {adapter_name!r} are {_few(holding)}. Load the adapter into a "
                            "fresh base model, or call minilora.unload(model) first.")


def check_tensors(tensors: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]], source: str,
                  config: LoraConfig | None, model: nn.Module, autocast_adapter_dtype: bool = True) -> None:
    """Missing keys, unexpected keys, shapes, dtypes, finiteness: every problem, before any change."""
    missing = sorted(set(shapes) - set(tensors))
    unexpected = sorted(set(tensors) - set(shapes))
    if missing or unexpected:
        has_layers = any(True for _ in lora_layers(model))
        hint = ("The adapter was saved for other layers than this model's minilora layers: load it into a fresh "
                "base model, or call minilora.unload(model) first." if has_layers else
                "The adapter was saved from another model or with other target_modules.")
        if len(unexpected) > len(shapes):
            hint = "This looks like a whole model's state dict, not an adapter. " + PAIRS_HINT
        raise MiniLoraError(f"{source} does not fit this {type(model).__name__}: missing keys {_few(missing)}, "
                            f"unexpected keys {_few(unexpected)}. {hint}")
    for key, shape in shapes.items():
        tensor = tensors[key]
        if tuple(tensor.shape) != shape:
            hint = (f"The adapter has r={config.r} (adapter_config.json) but this model's layers have another r: "
                    "load it into a fresh base model, or call minilora.unload(model) first."
                    if config is not None and ".lora_" in key and any(True for _ in lora_layers(model)) else
                    "The adapter was saved from another model (or another r than its config says).")
            raise MiniLoraError(f"{source}: {key} has shape {tuple(tensor.shape)} but this model needs {shape}. "
                                f"{hint}")
        if tensor.dtype not in LOADABLE_DTYPES:
            raise MiniLoraError(f"{source}: {key} holds {tensor.dtype}; adapters hold float16, bfloat16, float32 "
                                "or float64 numbers. The file is corrupt or was made by another tool: save the "
                                "adapter again.")
        # The values the model will hold: float64 values beyond float32's range become inf in the cast.
        held = held_dtype(model, key, autocast_adapter_dtype)
        if not bool(torch.isfinite(tensor.to(held)).all()):
            cast = f" once cast to the model's {held}" if tensor.dtype != held else ""
            raise MiniLoraError(f"{source}: {key} holds NaN or inf values{cast}: the file is corrupt or the "
                                "training diverged. Nothing was loaded.")


LOADABLE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")  # PEFT's (peft/utils/constants.py)


def saved_embedding_weights(model: nn.Module, renamed: dict[str, torch.Tensor], lora_targets: list[str],
                            source: str) -> dict[str, torch.Tensor]:
    """PEFT's files of an adapter that targets ``lm_head`` (or ``embed_tokens``) also hold that layer's
    base weight, ``lm_head.base_layer.weight`` (save_embedding_layers="auto"), and PEFT loads it back.
    Those keys are taken out of ``renamed`` and returned by layer name, checked like the adapter's own.

    Raises:
        MiniLoraError: for such a tensor of another shape, a non-float dtype, or NaN / inf values.
    """
    found = {}
    for name in lora_targets:
        key = f"{name}.base_layer.weight"
        if name.split(".")[-1] in EMBEDDING_LAYER_NAMES and key in renamed:
            value, weight = renamed.pop(key), model.get_submodule(name).weight
            if value.shape != weight.shape or value.dtype not in LOADABLE_DTYPES or not bool(
                    torch.isfinite(value.to(weight.dtype)).all()):
                raise MiniLoraError(f"{source}: {key} (the base weight PEFT saves with an adapter on {name!r}) has "
                                    f"shape {tuple(value.shape)} and dtype {value.dtype}, or NaN / inf values; this "
                                    f"model's is {tuple(weight.shape)}. The file does not belong to this model.")
            found[name] = value
    return found


def held_dtype(model: nn.Module, key: str, autocast_adapter_dtype: bool = True) -> torch.dtype:
    """The dtype ``model`` will hold the tensor ``key`` (the model's key after loading) in.

    An existing parameter keeps its dtype; A and B of a layer ``inject`` is about to build take the
    base weight's dtype, float32 for a float16 / bfloat16 base with ``autocast_adapter_dtype``
    (LoraLinear, as PEFT does).
    """
    state = model.state_dict(keep_vars=True)
    if key in state:
        return state[key].dtype
    if is_saved_module_key(key):  # a copy not made yet: the module's own dtype (wrapped by another adapter or not)
        plain = original_key(key)
        return state[plain if plain in state else original_key(key, wrapped=True)].dtype
    module, _, _ = key.partition(".lora_") if ".lora_" in key else key.rpartition(".base_layer.bias")
    name = f"{module}.weight" if ".lora_" in key else f"{module}.bias"
    dtype = state[name if name in state else f"{module}.base_layer.weight"].dtype  # (a LoRA layer already)
    return torch.float32 if autocast_adapter_dtype and dtype in HALF_DTYPES and ".lora_" in key else dtype


def check_rank_agrees(tensors: Mapping[str, torch.Tensor], config: LoraConfig, source: str) -> None:
    """A file whose config says one r and whose tensors have another contradicts itself: refuse it,
    whatever the model (a model with layers of the tensors' r would accept the shapes and take the
    config's scaling)."""
    for key, tensor in tensors.items():
        side = 0 if ".lora_A." in key else 1 if ".lora_B." in key else None  # (r, in) or (out, r)
        r = layer_rank_and_alpha(key.partition(".lora_")[0], config)[0]  # rank_pattern, else config.r
        if side is not None and tensor.dim() == 2 and tensor.shape[side] != r:
            raise MiniLoraError(f"{source}: adapter_config.json says r={r} but {key} has shape "
                                f"{tuple(tensor.shape)}, i.e. r={tensor.shape[side]}: the config and the weights "
                                "disagree. Save the adapter again.")


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def load_adapter(model: nn.Module, source: str | os.PathLike | Mapping[str, torch.Tensor] | AdapterFiles,
                 is_trainable: bool = False, adapter_name: str = DEFAULT_ADAPTER,
                 autocast_adapter_dtype: bool = True) -> nn.Module:
    """Load an adapter saved by minilora or PEFT into ``model``, in place; the result gives its trained outputs.

    - A model without minilora layers is injected with the adapter's config, then given its weights.
    - A model whose minilora layers match the adapter (same layers, same shapes) gets the weights, and the
      adapter's ``scaling``, in those layers: parameters stay the same objects (an optimizer keeps working).
    - A saved ``ensure_weight_tying`` (PEFT's field) is honoured as PEFT's loading does (compat_tying.py):
      the same warnings about layers tied to the input embedding, and a MiniLoraError where PEFT would
      put LoRA on the embedding or share one trained copy between tied layers.

    Args:
        model: the base model (or one that already has matching minilora layers).
        source: an adapter directory (``adapter_config.json`` + ``adapter_model.safetensors`` or ``.bin``),
            or a dict of adapter tensors (PEFT's or minilora's keys) for a model that already has its layers,
            or a directory already read by ``read_adapter_files``.
        is_trainable: as in PEFT: False freezes everything (for inference); True lets A and B train
            (and the biases, per the config's ``bias``).
        adapter_name: the name the adapter gets in the model. A model that has minilora layers but no
            adapter of that name gets it added (``minilora.add_adapter``), inactive and, unless
            ``is_trainable``, frozen, as PEFT's ``load_adapter`` does; the other adapters are left as they are.
        autocast_adapter_dtype: for an adapter this call builds in a float16 / bfloat16 model: A and B in
            float32 (True, PEFT's default) or in the model's dtype (False). Existing layers keep their dtype.

    Returns:
        the same ``model`` object.

    Raises:
        MiniLoraError: before anything is changed, for a missing or corrupt file, another kind of adapter,
            keys or shapes that do not fit the model, merged layers, or a whole nn.Module where an adapter was
            expected (``torch.save(model)`` mixed up with saving an adapter).
    """
    if not isinstance(model, nn.Module):
        raise MiniLoraError(f"load_adapter(model, source) needs the model (an nn.Module) first, got "
                            f"{type(model).__name__}.")
    reject_whole_module(source, "load_adapter")
    check_autocast_adapter_dtype(autocast_adapter_dtype)
    layers = list(lora_layers(model))
    adding = bool(layers) and not any(adapter_name in layer.lora_A for _, layer in layers)  # a new adapter
    merged = [name for name, layer in layers if adapter_name in layer.merged_adapters]
    if merged:
        raise MiniLoraError(f"Layers {_few(merged)} are merged (their W0 holds the old dW); loading new A and B "
                            "would leave the old update inside W0. Call minilora.unmerge(model) first.")

    device = _device_of(model)
    if isinstance(source, Mapping):
        if not layers:
            raise MiniLoraError("A dict of tensors carries no config (r, lora_alpha, target_modules), so it can "
                                "only be loaded into a model that already has minilora layers. Pass the adapter "
                                "directory instead, or minilora.inject(model, config) first.")
        config, config_origin, origin = adapter_config(model, adapter_name), "the model's config", "the state dict"
        if config is None:
            raise MiniLoraError(f"The model has no adapter {adapter_name!r} to load a dict of tensors into. Pass "
                                "the adapter directory (it holds the config) instead.")
        tensors = dict(source)
    else:
        files = source if isinstance(source, AdapterFiles) else read_adapter_files(_adapter_directory(source), device)
        directory, fields, config_origin, paired = files.directory, files.fields, files.config_origin, files.paired
        tensors = {key: value.to(device) if isinstance(value, torch.Tensor) else value
                   for key, value in files.tensors.items()}
        config = config_from_fields(fields, config_origin)
        path, origin = files.weights_path, str(files.weights_path)
        if not layers or adding:  # PEFT checks the saved ensure_weight_tying when it builds the adapter
            check_saved_tying(model, fields)
    if adding:
        check_can_add(model, adapter_name, config)
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()):
        raise MiniLoraError(f"{origin} is not a dict of named tensors. {PAIRS_HINT}")
    check_file_keys(tensors, adapter_name, origin, from_file=not isinstance(source, Mapping))
    renamed = {minilora_key(key, adapter_name): value for key, value in tensors.items()}
    if len(renamed) != len(tensors):
        raise MiniLoraError(f"{origin} holds two keys for one tensor (e.g. with and without base_model.model.).")
    try:  # modules_to_save are stored under their own names: classifier.weight -> classifier.modules_to_save...
        lora_targets = [name for name, _ in layers] or find_targets(model, config)
        saved_names = saved_module_names(model, config, lora_targets, adapter_name)
        extra = bias_all_keys(model, saved_names) if config.bias == "all" else []  # PEFT's (saved_modules.py)
        originals = {key: renamed.pop(key) for key in extra if key in renamed}
        for key in extra:  # the copy's bias a second time, which PEFT's loading ignores too
            renamed.pop(key.replace(BIAS_ALL_ORIGINAL, BIAS_ALL_COPY), None)
        renamed = {**to_model_keys(renamed, saved_names, adapter_name), **originals}
    except MiniLoraError as error:
        raise MiniLoraError(f"{config_origin}: {error}") from None
    embeddings = saved_embedding_weights(model, renamed, lora_targets, origin)  # (taken out of ``renamed``)
    if not isinstance(source, Mapping):
        check_rank_agrees(renamed, config, str(directory))
    try:
        shapes = expected_shapes(model, config, adapter_name)
    except MiniLoraError as error:  # the config's targets are not in this model
        raise MiniLoraError(f"{config_origin}: {error}") from None
    check_tensors(renamed, shapes, origin, config, model, autocast_adapter_dtype)
    if layers and not adding and not isinstance(source, Mapping):
        try:
            check_config_selects_the_layers(model, config, adapter_name)
        except MiniLoraError as error:
            raise MiniLoraError(f"{config_origin}: {error}") from None
    if not isinstance(source, Mapping) and not paired:  # last, so that a more specific problem is named first
        refuse_unpaired_config(directory / CONFIG_NAME, path)

    # Everything is checked: from here on nothing can fail.
    if not layers:
        inject(model, config, adapter_name, autocast_adapter_dtype)
        for _, layer in lora_layers(model):
            layer.train(model.training)  # new modules start in train mode; an eval model stays in eval
    elif adding:
        add_adapter(model, adapter_name, config, autocast_adapter_dtype)
    elif config is not adapter_config(model, adapter_name):
        config = _adopt_adapter_config(model, config, adapter_name)
    current = model.state_dict(keep_vars=True)  # the model's own parameters, by key
    with torch.no_grad():
        for key, value in renamed.items():
            current[key].copy_(value)  # in place, cast to the parameter's dtype and device
        for name, value in embeddings.items():  # PEFT loads the saved base weight too (the base model's, normally)
            model.get_submodule(name).weight.copy_(value)
    if adding:  # the other adapters keep their state; the new one (A, B, its modules_to_save copies) trains if asked
        for _, layer in lora_layers(model):
            if adapter_name in layer.lora_A:
                for module in (layer.lora_A[adapter_name], layer.lora_B[adapter_name]):
                    module.requires_grad_(is_trainable)
        for _, wrapper in saved_modules(model):
            if adapter_name in wrapper.modules_to_save:
                wrapper.modules_to_save[adapter_name].requires_grad_(is_trainable)
    elif is_trainable:
        mark_only_lora_as_trainable(model, config.bias if config is not None else "none")
    else:
        for param in model.parameters():
            param.requires_grad_(False)
    return model


def reject_whole_module(source: object, action: str) -> None:
    """PEFT's pitfall 2: ``torch.save(model)`` pickles the whole model; loading functions want weights."""
    if isinstance(source, nn.Module):
        raise MiniLoraError(
            f"{action} got a whole model ({type(source).__name__}) where an adapter directory or a state dict was "
            "expected. torch.save(model) pickles the whole model object, and torch.load gives that model back, "
            "not its weights: use the loaded object as the model itself, or save the weights instead.\n"
            f"{PAIRS_HINT}"
        )


def _adopt_adapter_config(model: nn.Module, config: LoraConfig, adapter_name: str = DEFAULT_ADAPTER) -> LoraConfig:
    """The loaded adapter's numbers belong to it: its lora_alpha, scaling (rsLoRA or not) and dropout go
    on the layers (r already agrees: the shapes were checked), its fields into the model's config (which
    keeps its own type and any other fields, e.g. a task type), as PEFT's load_adapter does.

    Returns the model's new config.
    """
    adapter = adapter_name
    for name, layer in lora_layers(model):
        if adapter not in layer.lora_A:
            continue
        r = layer.r[adapter]
        layer.lora_alpha[adapter] = layer_rank_and_alpha(name, config)[1]
        layer.scaling[adapter] = layer.lora_alpha[adapter] / (math.sqrt(r) if config.use_rslora else r)
        dropout = nn.Dropout(p=config.lora_dropout) if config.lora_dropout > 0.0 else nn.Identity()
        layer.lora_dropout[adapter] = dropout.train(layer.training)
    old = adapter_config(model, adapter)
    if old is not None:
        config = dataclasses.replace(old, **{name: getattr(config, name) for name in (*ADAPTER_FIELDS, "lora_dropout")})
    set_adapter_config(model, adapter, config)
    return config


def _adapter_directory(source: object) -> Path:
    if not isinstance(source, (str, os.PathLike)):
        raise MiniLoraError(f"load_adapter needs an adapter directory (a str or Path) or a dict of tensors, got "
                            f"{type(source).__name__}.")
    directory = Path(source)
    if directory.is_file():
        raise MiniLoraError(f"{directory} is a file; load_adapter reads the directory that holds {CONFIG_NAME} "
                            f"and {WEIGHTS_NAME}. (A file from torch.save(model) holds a whole model.)\n"
                            f"{PAIRS_HINT}")
    if not directory.is_dir():
        raise MiniLoraError(f"Adapter directory {directory} does not exist. Pass the directory that "
                            "minilora.save_adapter or PEFT's save_pretrained wrote.")
    return directory


def _device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    if param is None:
        raise MiniLoraError(f"This {type(model).__name__} has no parameters, so there is nothing to adapt.")
    return param.device


def _few(names: list[str], limit: int = 4) -> str:
    """A list of names, cut short for an error message."""
    shown = ", ".join(names[:limit]) or "none"
    return f"[{shown}{f', ... ({len(names)} in all)' if len(names) > limit else ''}]"
