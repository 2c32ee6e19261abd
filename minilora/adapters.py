"""Adapters on disk in PEFT's format: ``save_adapter`` and ``load_adapter``.

An adapter directory holds what ``peft.PeftModel.save_pretrained`` writes, so either library reads
the other's files:

    adapter_config.json          the LoraConfig, with PEFT's field names (see adapter_config.py)
    adapter_model.safetensors    A and B of every wrapped layer, under PEFT's keys:
        base_model.model.<layer>.lora_A.weight    (r, in)
        base_model.model.<layer>.lora_B.weight    (out, r)

In memory the same tensors are ``<layer>.lora_A.<adapter>.weight`` (PEFT's in-memory names too); a
file holds one adapter, so its keys drop the adapter's name, as PEFT's files do.

Where PEFT also saves the embedding layers' own weights (an adapter on ``lm_head``, a resized
vocabulary: ``save_embedding_layers``), so does ``save_adapter``, under PEFT's keys (saved_embeddings.py).

Older PEFT releases wrote ``adapter_model.bin`` (a ``torch.save`` pickle) instead; ``load_adapter``
reads it too. W0 is not in the files: it comes from the base model the adapter is loaded into, and
``h = W0 x + scaling * B A x`` needs only ``A``, ``B`` and ``scaling = lora_alpha / r``.

Loading is strict, as torchtune's is: every check (files, JSON, fields, keys, shapes, values) runs
before the model is touched, and any failure raises MiniLoraError with the model left as it was. A
safetensors file is checked twice: its header's names, shapes and dtypes first, then the values of only
the tensors that load, once read.

Read this file for the lesson: the key mapping (``minilora_key``; ``file_key`` is in adapter_files.py)
and the flow of a save and a load, top to bottom. Beside it: adapter_config.py (the JSON),
adapter_files.py (reading the directory once and refusing hostile or mismatched files),
safetensors_file.py (the weights' header, then the values on request), adapter_checks.py (does the adapter
fit the model: keys, shapes, dtypes, values), files.py (crash-safe writing, and pairing weights with their
config).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import os
import re
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .adapter_checks import (check_config_selects_the_layers, check_dense, check_file_keys, check_not_sharded,
                             check_rank_agrees, check_tensors, expected_shapes, few, nested_original_biases,
                             other_layers_biases, saved_config, saved_embedding_weights, saved_module_names)
from .adapter_config import (ADAPTER_FIELDS, CONFIG_NAME, DIGESTED_FIELDS, config_fields, config_from_fields,
                             config_text, read_config_fields)
from .adapter_files import (LEGACY_WEIGHTS_NAME, PAIRS_HINT, PEFT_PREFIX, WEIGHTS_NAME, AdapterFiles, file_key,
                            read_adapter_files, refuse_unpaired_config)
from .compat_tying import check_saved_tying
from .saved_embeddings import base_tensor, saved_embedding_state, wrapped_embedding_keys
from .config import LoraConfig, MiniLoraError
from .files import (check_writable, commit, discard, remove_abandoned_temporaries, remove_atomically, stage,
                    weights_metadata, write_error_hint)
from .inject import (DEFAULT_ADAPTER, adapter_config, inject, is_lora_parameter, lora_layers,
                     mark_only_lora_as_trainable, set_adapter_config)
from .layer import check_autocast_adapter_dtype
from .multi import add_adapter, check_can_add
from .saved_modules import (BIAS_ALL_COPY, BIAS_ALL_ORIGINAL, bias_all_keys, copy_part, is_saved_module_key,
                            nested_bias_all_keys,
                            saved_modules, saved_state, to_model_keys)
from .targets import find_targets, layer_rank_and_alpha


# --------------------------------------------------------------------------------------------
# Keys: the model's <-> the file's
# --------------------------------------------------------------------------------------------
# The model's key -> the file's: ``file_key`` (adapter_files.py, PEFT's rule; saved modules use it too):
# ``h.0.attn.c_attn.lora_A.default.weight`` -> ``h.0.attn.c_attn.lora_A.weight``.


def minilora_key(key: str, adapter: str = "default") -> str:
    """A file's (or PEFT's in-memory) key -> the model's own: drop ``base_model.model.`` and put
    ``adapter`` after lora_A / lora_B, in place of the name there was (if any).

    ``base_model.model.h.0.attn.c_attn.lora_A.weight`` -> ``h.0.attn.c_attn.lora_A.default.weight``.
    """
    key = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
    return re.sub(r"\.(lora_[AB])(\.[^.]+)?\.(weight|bias)$", rf".\1.{adapter}.\3", key)  # (bias: lora_bias)


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------
def adapter_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor] | None = None,
                       adapter_name: str = DEFAULT_ADAPTER, save_embedding_layers: bool | str = "auto",
                       ) -> dict[str, torch.Tensor]:
    """The tensors an adapter file holds, under PEFT's keys: A and B of every LoRA layer, plus the
    biases when the config trains them (``bias="all"``: every bias; ``"lora_only"``: the wrapped layers'),
    plus the embedding layers' own weights where PEFT saves them (saved_embeddings.py).

    Args:
        state_dict: take the values from here instead of ``model.state_dict()`` (``transformers.Trainer``
            passes one); the keys are minilora's, i.e. the model's own.
        adapter_name: which adapter; its name is left out of the keys, as in PEFT's files.
        save_embedding_layers: PEFT's argument: "auto" (an embedding layer is a target, or the
            vocabulary was resized: with PEFT's warning), True or False.
    """
    config = saved_config(model, adapter_name)
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
        others = tuple(f"{name}.original_module." for name, wrapper in saved_modules(model) if name not in holding)
        lora.update({name: name for name in state if name.startswith(others) and name.endswith(".bias")})
        # (PEFT saves every bias: those of other adapters' saved modules as their originals' keys, too)
    elif config.bias == "lora_only":
        lora.update({f"{layer}.base_layer.bias": f"{layer}.base_layer.bias" for layer, _ in lora_layers(model)
                     if f"{layer}.base_layer.bias" in state})
    tensors = {PEFT_PREFIX + key: state[name] for name, key in lora.items()}
    saved = saved_state(model, state, adapter_name)  # modules_to_save: this adapter's copies
    tensors.update({PEFT_PREFIX + key: value for key, value in saved.items()})
    embeddings = saved_embedding_state(model, state, config, adapter_name, save_embedding_layers)
    tensors.update({PEFT_PREFIX + key: value for key, value in embeddings.items()})
    return tensors


def save_adapter(model: nn.Module, directory: str | os.PathLike, safe_serialization: bool = True,
                 state_dict: Mapping[str, torch.Tensor] | None = None, adapter_name: str = DEFAULT_ADAPTER,
                 save_embedding_layers: bool | str = "auto") -> None:
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
        save_embedding_layers: see ``adapter_state_dict``: PEFT's default "auto" also saves the base
            weight of a targeted lm_head, or both embedding layers of a resized vocabulary.

    Raises:
        MiniLoraError: if the model has no minilora layers, its layers no longer agree with its config,
            an embedding layer to save is in modules_to_save, or the directory cannot be written (probed
            before the weights' bytes are made; a write that still fails, a full disk, changes nothing).
    """
    prepare_save(model, directory, safe_serialization, state_dict, adapter_name, save_embedding_layers).write()


def prepare_save(model: nn.Module, directory: str | os.PathLike, safe_serialization: bool = True,
                 state_dict: Mapping[str, torch.Tensor] | None = None,
                 adapter_name: str = DEFAULT_ADAPTER, save_embedding_layers: bool | str = "auto") -> PreparedSave:
    """Every check of ``save_adapter`` (the model, the folder, with PEFT's warnings); writes nothing, and
    holds the tensors to write, not their bytes (``PreparedSave.write`` makes those, one adapter at a time).

    Raises:
        MiniLoraError: as ``save_adapter``, for everything but a write that fails.
    """
    config = saved_config(model, adapter_name)
    tensors = adapter_state_dict(model, state_dict, adapter_name, save_embedding_layers)
    check_not_sharded(tensors)
    directory = Path(directory)
    check_save_folder(directory)
    check_writable(directory, "Adapter folder", directory=True)  # (a missing one: its nearest existing parent)
    fields = config_fields(model, config)
    text = config_text(fields)
    # Binds the weights to this config, and says which config they replace (minilora/files.py)
    metadata = weights_metadata(fields, text, _config_in(directory), DIGESTED_FIELDS)
    return PreparedSave(directory, WEIGHTS_NAME if safe_serialization else LEGACY_WEIGHTS_NAME, tensors, metadata,
                        text.encode("utf-8"))


def check_save_folder(directory: Path) -> None:
    """Raise MiniLoraError if ``directory``, or a folder above it, is a file, or a folder stands where
    a save writes (or removes) a file: a rename cannot replace a folder, so this is found before any write."""
    for folder in (directory, *directory.parents):
        if folder.exists() and not folder.is_dir():
            raise MiniLoraError(f"{folder} is a file; save_adapter writes a directory there. Move the file, or pick "
                                "another path.")
    in_the_way = [name for name in (WEIGHTS_NAME, LEGACY_WEIGHTS_NAME, CONFIG_NAME)
                  if (directory / name).is_dir() and not (directory / name).is_symlink()]
    if in_the_way:
        raise MiniLoraError(f"{directory / in_the_way[0]} is a folder, where save_adapter writes a file. Remove it, "
                            "or save elsewhere.")


@dataclasses.dataclass
class PreparedSave:
    """One adapter's save, checked: ``write()`` turns its tensors into bytes and puts them on disk.
    Several adapters (``minilora.save_adapters``) are all checked before the first is written; each
    one's bytes exist only while it is written (with whole embedding matrices in every adapter's file,
    holding all of them at once would cost that many copies)."""

    directory: Path
    weights_name: str  # WEIGHTS_NAME, or LEGACY_WEIGHTS_NAME with safe_serialization=False
    tensors: dict[str, torch.Tensor]  # the model's own tensors (not copies), under the file's keys
    metadata: dict[str, str]
    config: bytes

    def weights(self) -> bytes:
        """The weights file's bytes. Each tensor is copied first, not taken as a view: on the fused path
        lora_A is a view into [W0; A], and torch.save would write the whole buffer that a view points into."""
        tensors = {key: value.detach().clone(memory_format=torch.contiguous_format)
                   for key, value in self.tensors.items()}
        if self.weights_name == WEIGHTS_NAME:
            from safetensors.torch import save
            return save(tensors, metadata={"format": "pt", **self.metadata})
        ordered = OrderedDict(tensors)
        ordered._metadata = self.metadata  # type: ignore[attr-defined]  # torch.load keeps it
        buffer = io.BytesIO()
        torch.save(ordered, buffer)
        return buffer.getvalue()

    def write(self) -> None:
        directory = self.directory
        missing = [folder for folder in (directory, *directory.parents) if not folder.exists()]
        staged = []
        data = self.weights()  # (this adapter's bytes only, made before any folder is)
        try:
            directory.mkdir(parents=True, exist_ok=True)
            remove_abandoned_temporaries(directory)
            # Both files are written out first (a full disk changes nothing), then renamed: weights first,
            # config second (files.py). Readers prefer safetensors: a .bin is in place before the old
            # safetensors file goes (until then readers find the old pair), a safetensors file before the old .bin goes.
            weights = directory / self.weights_name
            staged.append(stage(weights, data))
            staged.append(stage(directory / CONFIG_NAME, self.config))
            commit(staged[0], weights)
            if self.weights_name == LEGACY_WEIGHTS_NAME:
                remove_atomically(directory / WEIGHTS_NAME)
            commit(staged[1], directory / CONFIG_NAME)
            if self.weights_name == WEIGHTS_NAME:
                remove_atomically(directory / LEGACY_WEIGHTS_NAME)
        except BaseException as error:
            discard(staged)
            for folder in missing:  # the folders this save created, innermost first (only if still empty)
                with contextlib.suppress(OSError):
                    folder.rmdir()
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
            or a directory already read by ``read_adapter_files`` (loaded once: its weights file is closed then).
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
        raise MiniLoraError(f"Layers {few(merged)} are merged (their W0 holds the old dW); loading new A and B "
                            "would leave the old update inside W0. Call minilora.unmerge(model) first.")

    device = _device_of(model)
    files = source if isinstance(source, AdapterFiles) else None
    try:  # (the weights file is closed once read, or refused: a refusal kept in a traceback keeps no file open)
        if isinstance(source, Mapping):
            if not layers:
                raise MiniLoraError("A dict of tensors carries no config (r, lora_alpha, target_modules), so it "
                                    "can only be loaded into a model that already has minilora layers. Pass the "
                                    "adapter directory instead, or minilora.inject(model, config) first.")
            config = adapter_config(model, adapter_name)
            if config is None:
                raise MiniLoraError(f"The model has no adapter {adapter_name!r} to load a dict of tensors into. "
                                    "Pass the adapter directory (it holds the config) instead.")
            source_of = _Source("the state dict", config, "the model's config")
            tensors = dict(source)
        else:
            if files is None:
                files = read_adapter_files(_adapter_directory(source))
            config = config_from_fields(files.fields, files.config_origin)
            source_of = _Source(str(files.weights_path), config, files.config_origin, files)
            if not layers or adding:  # PEFT checks the saved ensure_weight_tying when it builds the adapter
                check_saved_tying(model, files.fields)
        if adding:
            check_can_add(model, adapter_name, config)
        if files is not None:  # names, shapes and dtypes first (a safetensors file's header), then the values
            header = _checked(model, files.tensors, source_of, adapter_name, layers, adding,
                              autocast_adapter_dtype, unread=True)
            tensors = files.read(_keys_used(files.tensors, header), device)
        renamed, embeddings, nested_originals = _checked(model, tensors, source_of, adapter_name, layers, adding,
                                                         autocast_adapter_dtype)
    finally:
        if files is not None:
            files.close()

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
        for name, attribute, value in embeddings:  # PEFT loads the saved base weight too (the base model's, normally)
            base_tensor(model, name, attribute).copy_(value)  # (a saved module's original)
        for key, value in nested_originals.items():  # the originals' biases inside saved modules, as PEFT loads them
            current[key].copy_(value)
    if adding:  # the other adapters keep their state; the new one (A, B, its modules_to_save copies) trains if asked
        for _, layer in lora_layers(model):
            if adapter_name in layer.lora_A:
                for module in (layer.lora_A[adapter_name], layer.lora_B[adapter_name]):
                    module.requires_grad_(is_trainable)
        for _, wrapper in saved_modules(model):
            if adapter_name in wrapper.modules_to_save:
                wrapper.modules_to_save[adapter_name].requires_grad_(is_trainable)
    elif is_trainable:
        mark_only_lora_as_trainable(model, config.bias)
    else:
        for param in model.parameters():
            param.requires_grad_(False)
    return model


@dataclasses.dataclass(frozen=True)
class _Source:
    """Where the tensors being loaded come from, for the checks and their messages."""

    origin: str  # the weights file, or "the state dict"
    config: LoraConfig  # (the file's, or the model's for a dict of tensors)
    config_origin: str
    files: AdapterFiles | None = None  # (None: a dict of tensors, loaded with the model's config)


def _checked(model: nn.Module, tensors: dict, source: _Source, adapter_name: str, layers: list, adding: bool,
             autocast_adapter_dtype: bool, unread: bool = False) -> tuple[dict, list, dict]:
    """Every check of ``tensors`` against the model (nothing changes): (the tensors under the model's keys,
    the embedding weights PEFT saves, the originals' biases inside saved modules), each holding the very
    tensor objects of ``tensors``. ``unread``: the tensors are a safetensors header's entries (on the meta
    device, no values read yet): they pass the checks of values, which run again once the values are read."""
    config, config_origin, origin, files = source.config, source.config_origin, source.origin, source.files
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()):
        raise MiniLoraError(f"{origin} is not a dict of named tensors. {PAIRS_HINT}")
    check_dense(tensors, origin, unread)
    check_file_keys(tensors, adapter_name, origin, from_file=files is not None)
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
        nested_originals = {}
        if config.bias == "all":  # the same for biases inside a saved module (PEFT writes those keys too)
            nested, repeats = nested_bias_all_keys(model, saved_names, list(renamed))
            nested_originals = {key: renamed.pop(key) for key in nested}  # (checked and loaded below)
            for key in repeats:
                renamed.pop(key)
        # an embedding layer in modules_to_save: PEFT's file also holds the wrapper's keys (saved_embeddings.py)
        wrapped_originals, ignored = wrapped_embedding_keys(model, saved_names)
        for key in ignored:  # <name>.modules_to_save.weight: PEFT's loading ignores it
            renamed.pop(key, None)
        wrapped_originals = {key: renamed.pop(key) for key in wrapped_originals if key in renamed}  # (checked below)
        renamed = {**to_model_keys(renamed, saved_names, adapter_name), **originals, **wrapped_originals}
    except MiniLoraError as error:
        raise MiniLoraError(f"{config_origin}: {error}") from None
    nested_original_biases(model, nested_originals, origin)
    if files is not None:
        check_rank_agrees(renamed, config, str(files.directory))
    try:
        shapes = expected_shapes(model, config, adapter_name)
    except MiniLoraError as error:  # the config's targets are not in this model
        raise MiniLoraError(f"{config_origin}: {error}") from None
    embeddings = saved_embedding_weights(model, renamed, lora_targets, origin, shapes, saved_names)  # (taken out)
    # (this adapter's own layers; the biases of every other LoRA layer are the other adapters' that PEFT writes too)
    own = [name for name, layer in layers if adapter_name in layer.lora_A] if layers and not adding else lora_targets
    other_layers_biases(model, renamed, shapes, own or lora_targets, config.bias)
    check_tensors(renamed, shapes, origin, config, model, autocast_adapter_dtype)
    if layers and not adding and files is not None:
        try:
            check_config_selects_the_layers(model, config, adapter_name)
        except MiniLoraError as error:
            raise MiniLoraError(f"{config_origin}: {error}") from None
    if files is not None and not files.paired and not unread:  # last, so that a more specific problem (NaN
        refuse_unpaired_config(files.directory / CONFIG_NAME, files.weights_path)  # in the values too) is named first
    return renamed, embeddings, nested_originals


def _keys_used(tensors: dict, checked: tuple[dict, list, dict]) -> list[str]:
    """The keys of ``tensors`` whose tensors ``_checked`` kept (PEFT's loading ignores a few: their values
    are never read)."""
    renamed, embeddings, nested_originals = checked
    kept = {id(value) for value in [*renamed.values(), *(value for *_, value in embeddings),
                                    *nested_originals.values()]}
    return [key for key, value in tensors.items() if id(value) in kept]


def read_for_existing_adapter(model: nn.Module, files: AdapterFiles, adapter_name: str) -> dict[str, torch.Tensor]:
    """The tensors of ``files`` that ``load_adapter(model, <them>, adapter_name=adapter_name)`` (a dict: the
    model's config) loads, read after every check of their names, shapes and dtypes against the model.
    The caller closes ``files`` (compat_loading.load_into_existing_adapter, once read or refused)."""
    config = adapter_config(model, adapter_name)
    layers = list(lora_layers(model))
    if config is None or not layers:  # (load_adapter refuses it, with its words)
        return files.read(files.tensors, _device_of(model))
    source = _Source(str(files.weights_path), config, "the model's config")
    checked = _checked(model, files.tensors, source, adapter_name, layers, False, True, unread=True)
    return files.read(_keys_used(files.tensors, checked), _device_of(model))


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
