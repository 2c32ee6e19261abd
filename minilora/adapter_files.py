"""An adapter directory read from disk, once, and refused if it is not what it claims to be.

What ``load_adapter`` (adapters.py) reads, and the checks that need only the files, not the model:

    adapter_config.json          read and checked by adapter_config.py (a regular file, JSON, PEFT's fields)
    adapter_model.safetensors    preferred, as PEFT prefers it: its header first (names, dtypes, shapes),
                                 which load_adapter checks against the model before it reads the values
                                 it loads, with plain reads (safetensors_file.py)
    adapter_model.bin            else this older file, read whole with ``torch.load(weights_only=True)``
                                 (never runs pickled code)

Each file is read once (``AdapterFiles``), so the config and the tensors come from one version of the
directory even while another process saves into it. The weights minilora writes carry a digest of their
config (files.py): ``paired_config_fields`` picks the config they were saved with, and a pair from two
different saves is refused (``refuse_unpaired_config``). Nothing here changes a model.
"""

from __future__ import annotations

import dataclasses
import io
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch

from .adapter_config import CONFIG_NAME, DIGESTED_FIELDS, check_regular_file, read_config_fields
from .config import MiniLoraError
from .files import config_for_weights
from .safetensors_file import SafetensorsFile, unreadable

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


def file_key(key: str, adapter_name: str) -> str:
    """The file's key for a key of the model, as PEFT 0.21.2 makes it
    (``tuners_utils.py::_remove_adapter_name_from_state_dict_key``): the adapter's name is dropped where
    it is the last part, or the last but one (``h.0.attn.c_attn.lora_A.default.weight`` ->
    ``h.0.attn.c_attn.lora_A.weight``; ``lm_head.modules_to_save.default.weight`` ->
    ``lm_head.modules_to_save.weight``; ``lm_head.original_module.weight`` stays). Never in the middle:
    a module may happen to have the adapter's name."""
    if "." not in key:
        return key
    if key.endswith(f".{adapter_name}"):  # an nn.Parameter held under the adapter's name
        return key.removesuffix(f".{adapter_name}")
    head, _, last = key.rpartition(".")
    return f"{head.removesuffix(f'.{adapter_name}')}.{last}"


@dataclasses.dataclass(frozen=True)
class AdapterFiles:
    """An adapter directory read once: the config fields its weights are read with, and its tensors.
    A reader that needs the config before loading (minilora.compat) reads this, then passes it to
    ``load_adapter``, so that both see one version of the files even while another process saves.

    ``tensors`` holds, for adapter_model.safetensors, the header's entries as tensors on the meta device
    (dtype and shape, no values): ``load_adapter`` checks them against the model before any value is
    read, as PEFT's memory-mapped read reads only what it loads, and then ``read`` reads the values it
    needs from the file opened with the header (the same version of it); then ``load_adapter`` closes it:
    these files load once. For the older .bin the tensors are read whole (a pickle has no header), and
    ``read`` hands them out."""

    directory: Path
    fields: dict
    config_origin: str  # where the fields are from (adapter_config.json, or the weights: paired_config_fields)
    paired: bool  # the fields are the weights' own (else load_adapter refuses the pair)
    weights_path: Path
    tensors: dict
    opened: SafetensorsFile | None = None  # (None: ``tensors`` hold their values)

    def read(self, keys: Iterable[str], device: torch.device) -> dict[str, torch.Tensor]:
        """The tensors ``keys`` with their values, on ``device``."""
        if self.opened is None:
            return {key: self.tensors[key].to(device) for key in keys}
        return {key: value.to(device) for key, value in self.opened.read(keys).items()}

    def close(self) -> None:
        """Close the weights file (load_adapter does, once it has read the values, or refused them)."""
        if self.opened is not None:
            self.opened.close()


def read_adapter_files(directory: Path) -> AdapterFiles:
    """Read ``directory``: adapter_config.json, and the weights' header (safetensors) or the weights (.bin)."""
    file_fields = read_config_fields(directory)
    path = _weights_path(directory)
    if path.name == WEIGHTS_NAME:
        opened = SafetensorsFile(path)
        tensors, metadata = opened.placeholders, opened.metadata
    else:
        opened, (tensors, metadata) = None, _read_bin(path)
    fields, origin, paired = paired_config_fields(directory, file_fields, path, metadata)
    return AdapterFiles(directory, fields, origin, paired, path, tensors, opened)


def _read_bin(path: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(tensors, metadata or None) of the older ``adapter_model.bin``, read once with
    ``torch.load(weights_only=True)``, which never runs pickled code."""
    try:
        tensors = torch.load(io.BytesIO(path.read_bytes()), map_location="cpu", weights_only=True)
        metadata = getattr(tensors, "_metadata", None)
        if isinstance(tensors, dict):
            tensors = {key: value.to("cpu") if isinstance(value, torch.Tensor) else value
                       for key, value in tensors.items()}  # (a meta tensor fails here: it has no values)
    except Exception as error:  # a corrupt file can fail in many ways inside the unpickler
        raise unreadable(path, error) from None
    if not isinstance(tensors, dict):
        raise MiniLoraError(f"{path} does not hold a dict of named tensors ({type(tensors).__name__}). "
                            f"{PAIRS_HINT}")
    return tensors, metadata if isinstance(metadata, dict) else None


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
    origin = f"{weights_path} (the config saved in it: the save that wrote it had not yet replaced {CONFIG_NAME})"
    warnings.warn(f"{directory / CONFIG_NAME} is the config that the save of {weights_path.name} replaces: that save "
                  "stopped (or is still running) before writing its config, so the adapter is read with the config "
                  f"saved in the weights. If you edited {CONFIG_NAME} by hand, save the adapter again instead.",
                  stacklevel=3)
    return fields, origin, True


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


def read_saved_config_fields(directory: Path) -> tuple[dict, str]:
    """(fields, where they are from): the config ``load_adapter`` reads the adapter in ``directory`` with
    (see ``paired_config_fields``), for readers that need the config before loading (minilora.compat).
    Reads the weights' metadata only where it can (a safetensors header)."""
    file_fields = read_config_fields(directory)
    path = _weights_path(directory)
    if path.name == WEIGHTS_NAME:
        opened = SafetensorsFile(path)
        metadata = opened.metadata
        opened.close()
    else:
        metadata = _read_bin(path)[1]
    fields, origin, _ = paired_config_fields(directory, file_fields, path, metadata)
    return fields, origin
