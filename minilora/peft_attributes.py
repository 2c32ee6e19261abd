"""The names PEFT's own code reads on a config and on a LoRA layer, so that code written for PEFT
(its tests, training scripts, helpers such as ``peft.get_peft_model_state_dict``) runs on minilora's
objects. Nothing here changes what LoRA computes; the math is in layer.py.

- ``LoraConfig`` (config.py) gets ``peft_type``, ``is_prompt_learning``, ``is_adaption_prompt``,
  ``to_dict``, ``save_pretrained`` and ``from_pretrained`` from ``PeftConfigAttributes``
  (peft 0.21.2, ``peft/config.py``: ``PeftConfigMixin``).
- ``LoraLinear`` (layer.py) gets ``disable_adapters``, ``get_base_layer``, ``get_delta_weight``, the
  per-adapter feature flag ``use_dora`` (always False: minilora has no DoRA) and the lists of
  per-adapter tables PEFT walks, from ``PeftLayerAttributes``
  (``peft/tuners/tuners_utils.py``: ``BaseTunerLayer``; ``peft/tuners/lora/layer.py``: ``LoraLayer``).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import sys
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from .files import check_writable, write_atomically, write_error_hint


class PeftType(str, enum.Enum):
    """PEFT's ``PeftType``, LoRA only. A str enum: ``PeftType.LORA == "LORA"``, and it equals (and hashes
    like) ``peft.PeftType.LORA``, so PEFT's tables keyed by peft type find it."""

    LORA = "LORA"


CONFIG_FILE = "adapter_config.json"  # (adapter_config.py's CONFIG_NAME; that module imports config.py)


def peft_warning() -> type[Warning]:
    """The category of a warning PEFT gives as a ``PeftWarning``: PEFT's class (a UserWarning) when PEFT is
    imported, else UserWarning. Code that filters or expects PeftWarning has imported PEFT, so it sees
    PEFT's category; minilora does not import PEFT for it."""
    return getattr(sys.modules.get("peft.utils.warning"), "PeftWarning", UserWarning)


class PeftConfigAttributes:
    """What PEFT's ``PeftConfigMixin`` offers, for a dataclass config of LoRA fields."""

    @property
    def peft_type(self) -> PeftType:
        """Always LoRA (PEFT sets ``peft_type = PeftType.LORA`` in ``LoraConfig.__post_init__``)."""
        return PeftType.LORA

    @property
    def is_prompt_learning(self) -> bool:
        """False: LoRA changes weights, not prompts (PEFT reads this to pick a save / load path)."""
        return False

    @property
    def is_adaption_prompt(self) -> bool:
        return False

    def to_dict(self) -> dict[str, Any]:
        """Every field, plus ``peft_type``, as PEFT's ``to_dict`` (``dataclasses.asdict``) gives them."""
        return {"peft_type": self.peft_type, **dataclasses.asdict(self)}

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Write ``save_directory/adapter_config.json`` (the directory is created), as PEFT's config
        ``save_pretrained`` does: every field, sorted keys, two-space indent. The file is replaced in
        one step, so a crash leaves the old file or the new one.

        Raises:
            MiniLoraError: if ``save_directory`` is a file or cannot be written, or for PEFT's hub options
                (``push_to_hub``...): minilora writes local directories only.
        """
        from .config import MiniLoraError

        if kwargs:
            raise MiniLoraError(f"LoraConfig.save_pretrained takes a directory only, got {sorted(kwargs)}: minilora "
                                "does not push to a hub. Save locally, then upload with huggingface_hub.")
        check_writable(save_directory, "save_pretrained: the directory", directory=True)
        directory = Path(save_directory).expanduser()
        fields = {name: _json_value(value) for name, value in self.to_dict().items()}
        try:
            directory.mkdir(parents=True, exist_ok=True)
            write_atomically(directory / CONFIG_FILE, (json.dumps(fields, indent=2, sort_keys=True) + "\n").encode())
        except OSError as error:
            raise MiniLoraError(f"Could not write {directory / CONFIG_FILE}: {error}. {write_error_hint(error)}") \
                from error

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None,
                        **kwargs: Any):
        """The config in ``directory[/subfolder]/adapter_config.json`` (written by PEFT or minilora).

        Keys this class has no field for are left out with PEFT's one warning ("Unexpected keyword
        arguments [...] for class LoraConfig, these are ignored"), except those that only say where the
        file came from (``peft_version``, ``auto_mapping``, ...) and PEFT features left unused. A used PEFT
        feature minilora does not have is a MiniLoraError (see adapter_config.py). Keyword arguments set
        fields after loading.

        Raises:
            MiniLoraError: for a missing or broken file, another PEFT method, a used unsupported feature,
                a bad value, or an unknown keyword.
        """
        from .adapter_config import read_config_fields
        from .config import MiniLoraError

        directory = Path(pretrained_model_name_or_path).expanduser() / (subfolder or "")
        if not directory.is_dir():
            raise MiniLoraError(f"LoraConfig.from_pretrained: {str(directory)!r} is not a directory. minilora reads "
                                "configs from local directories; for a hub adapter use PeftModel.from_pretrained, "
                                "which resolves hub ids.")
        return cls.from_fields(read_config_fields(directory), str(directory / CONFIG_FILE), **kwargs)

    @classmethod
    def from_fields(cls, fields: Mapping[str, Any], source: str, **kwargs: Any):
        """The config of the JSON fields ``fields`` (read from ``source``), as ``from_pretrained`` makes it."""
        from .adapter_config import METADATA_FIELDS, UNSUPPORTED_FIELDS, config_from_fields
        from .config import MiniLoraError

        fields = _without_runtime_config(dict(fields))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (its own "fields minilora does not know"; PEFT's words below)
            config_from_fields(fields, source)  # checks: LoRA, features, values
        known = {field.name for field in dataclasses.fields(cls)}
        wrong = sorted(set(kwargs) - known)
        if wrong:
            raise MiniLoraError(f"LoraConfig.from_pretrained got {wrong}, which are not LoraConfig fields.")
        ignored = sorted(set(fields) - known - set(METADATA_FIELDS) - set(UNSUPPORTED_FIELDS))  # (those: unused)
        if ignored:
            warnings.warn(f"Unexpected keyword arguments {ignored} for class {cls.__name__}, these are ignored. This "
                          "probably means that the configuration file was saved by a newer PEFT.", stacklevel=3)
        values = {name: value for name, value in fields.items() if name in known}
        return cls(**{**values, **kwargs})

    @classmethod
    def from_json_file(cls, path_json_file: str | os.PathLike) -> dict[str, Any]:
        """The fields in the JSON file ``path_json_file``, as a dict (PEFT's ``from_json_file``)."""
        from .adapter_config import read_json_fields

        return _without_runtime_config(read_json_fields(Path(path_json_file)))


def _without_runtime_config(fields: dict[str, Any]) -> dict[str, Any]:
    """PEFT's runtime-only settings (``runtime_config``) do not belong in a file: left out with PEFT's warning."""
    if "runtime_config" in fields:
        warnings.warn("The configuration file contains a `runtime_config` key. This is ignored. Runtime "
                      "configurations are only valid at runtime.", stacklevel=3)
        fields = {name: value for name, value in fields.items() if name != "runtime_config"}
    return fields


def _json_value(value: Any) -> Any:
    """A field's value as JSON holds it: enums by value, sets as sorted lists (PEFT writes sets as lists)."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    return value


class PeftLayerAttributes:
    """What PEFT's ``BaseTunerLayer`` / ``LoraLayer`` offer, for LoraLinear (one kind of LoRA, no variants)."""

    # The per-adapter tables, by attribute name: PEFT walks these to delete an adapter, report
    # requires_grad and devices (get_layer_status), or check what an adapter left behind.
    adapter_layer_names = ("lora_A", "lora_B")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout", "lora_bias")

    @property
    def disable_adapters(self) -> bool:
        """True while the adapters are switched off (minilora's ``disabled``)."""
        return self.disabled

    @property
    def _disable_adapters(self) -> bool:
        return self.disabled

    def get_base_layer(self) -> torch.nn.Module:
        """The wrapped nn.Linear / Conv1D."""
        return self.base_layer

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """PEFT's name for ``delta_weight``: scaling * B A in the base weight's layout."""
        return self.delta_weight(adapter)

    @property
    def use_dora(self) -> Mapping[str, bool]:
        """{adapter: False}: minilora has no DoRA (a config asking for it is refused)."""
        return AllFalse(self.lora_A)

    @property
    def lora_variant(self) -> dict:
        """{}: every adapter is plain LoRA."""
        return {}


class AllFalse(Mapping):
    """{adapter: False} for each adapter in ``adapters`` (the layer's ``lora_A``), read live: an adapter
    added or deleted later is in it or gone from it, as in PEFT's per-adapter dicts. Read-only, so
    nothing can switch a feature on through it."""

    def __init__(self, adapters: Mapping) -> None:
        self._adapters = adapters

    def __getitem__(self, adapter: str) -> bool:
        if adapter not in self._adapters:
            raise KeyError(adapter)
        return False

    def __iter__(self) -> Iterator[str]:
        return iter(self._adapters)

    def __len__(self) -> int:
        return len(self._adapters)

    def __repr__(self) -> str:
        return repr(dict(self))
