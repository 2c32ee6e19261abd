"""``minilora.compat.LoraConfig``: PEFT's config, every field of it, on top of minilora's.

PEFT scripts build their config with PEFT's field names (``task_type``, ``inference_mode``, ...);
minilora's own ``LoraConfig`` (config.py) holds what LoRA computes, and this subclass adds the rest
of PEFT 0.21.2's fields: those that only record where an adapter came from, and PEFT features
minilora does not have, each refused by name when used.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from dataclasses import dataclass
from typing import Any, Optional

from torch import nn

from .adapter_config import check_unsupported
from .config import LoraConfig as _MiniLoraConfig
from .config import MiniLoraError
from .targets import is_all_linear, resolve_target_modules


class TaskType(str, enum.Enum):
    """PEFT's task types (the same strings). minilora records the task in adapter_config.json only."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


@dataclass
class LoraConfig(_MiniLoraConfig):
    """``minilora.LoraConfig`` plus the other fields of PEFT's (peft 0.21.2), so that any PEFT script's
    config builds.

    ``task_type``, ``inference_mode``, ``base_model_name_or_path`` and ``revision`` are recorded (and
    ``inference_mode=True`` freezes the adapter, as in PEFT). ``auto_mapping`` and ``peft_version``
    hold what a file read had in them; ``peft_version`` is None for a config built here: PEFT stamps its
    own release, and minilora is not a PEFT release (nor does it write the key into adapter files: PEFT
    0.6 to 0.13 refuse a config with a key they do not know). The fields after them are PEFT features
    minilora does not have (DoRA, VeLoRA, LoRA on bare parameters, ...): their defaults mean "not
    used", and using one is a MiniLoraError that names the feature, rather than an adapter that
    silently computes something else (adapter_config.UNSUPPORTED_FIELDS).
    """

    fan_in_fan_out: Optional[bool] = False  # PEFT's default (minilora's own is None: each layer's layout)
    task_type: Optional[str] = None
    inference_mode: bool = False
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    auto_mapping: Optional[dict] = None
    peft_version: Optional[str] = None
    use_dora: bool = False
    lora_bias: bool = False
    layer_replication: Optional[list] = None
    target_parameters: Optional[list] = None
    trainable_token_indices: Optional[Any] = None
    loftq_config: dict = dataclasses.field(default_factory=dict)
    megatron_config: Optional[dict] = None
    megatron_core: Optional[str] = "megatron.core"  # (which module megatron_config's layers come from)
    use_qalora: bool = False
    qalora_group_size: int = 16  # (used with use_qalora only)
    eva_config: Optional[Any] = None
    corda_config: Optional[Any] = None
    alora_invocation_tokens: Optional[list] = None
    arrow_config: Optional[Any] = None
    kasa_config: Optional[Any] = None
    lora_ga_config: Optional[Any] = None
    monteclora_config: Optional[Any] = None
    use_bdlora: Optional[Any] = None
    velora_config: Optional[Any] = None
    ensure_weight_tying: bool = False

    def validate(self) -> None:
        """minilora's checks, then PEFT's task types, then "no PEFT feature minilora lacks is used"."""
        init = self.init_lora_weights
        if isinstance(init, str) and init != "gaussian":  # PEFT's other initialisations: "pissa", "olora", ...
            raise MiniLoraError(f"init_lora_weights={init!r} is one of PEFT's data- or SVD-based initialisations, "
                                "which minilora does not have: it has True (PEFT's default: kaiming-uniform A, "
                                "zero B), 'gaussian' and False.")
        if not isinstance(self.ensure_weight_tying, bool):  # (what it does: compat_tying.py, at injection)
            raise MiniLoraError(f"ensure_weight_tying must be True or False (a bool), got {self.ensure_weight_tying!r}.")
        check_unsupported(vars(self), "LoraConfig")  # first: a used PEFT feature is named before any other complaint
        super().validate()
        if not isinstance(self.inference_mode, bool):
            raise MiniLoraError(f"inference_mode must be True or False (a bool), got {self.inference_mode!r}.")
        if self.auto_mapping is not None and not isinstance(self.auto_mapping, dict):
            raise MiniLoraError(f"auto_mapping must be None or a dict, got {self.auto_mapping!r}.")
        for name in ("base_model_name_or_path", "revision", "peft_version"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise MiniLoraError(f"{name} must be None or a string, got {getattr(self, name)!r}.")
        if self.task_type is not None and self.task_type not in TaskType.__members__:
            raise MiniLoraError(f"Invalid task type: '{self.task_type}'. Must be one of the following task types: "
                                f"{', '.join(TaskType)}. (task_type={self.task_type!r} is not one of PEFT's task "
                                "types.)")
        if self.task_type is not None:
            self.task_type = TaskType(self.task_type)
        check_unsupported(vars(self), "LoraConfig")
        for name in ("target_modules", "exclude_modules"):  # PEFT keeps a list of names as a set
            if isinstance(getattr(self, name), list):
                setattr(self, name, set(getattr(self, name)))


_dataclass_init = LoraConfig.__init__


@functools.wraps(_dataclass_init)
def _init_naming_unknown_fields(self, *args: Any, **kwargs: Any) -> None:
    """The dataclass __init__, after naming any field it does not know (a newer PEFT's, or a typo)
    in a MiniLoraError instead of Python's bare TypeError."""
    known = {f.name for f in dataclasses.fields(LoraConfig)}
    # PEFT's LoraConfig takes peft_type too, and sets it to LORA whatever it was (its __post_init__);
    # here peft_type is always "LORA" (a property, peft_attributes.py), so the keyword is dropped likewise.
    kwargs.pop("peft_type", None)
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise MiniLoraError(f"LoraConfig got fields minilora does not know: {unknown}. They are probably from a newer "
                            "PEFT (or misspelt); minilora cannot honour them, so it stops rather than train something "
                            f"else. Its fields: {sorted(known)}.")
    _dataclass_init(self, *args, **kwargs)


LoraConfig.__init__ = _init_naming_unknown_fields


def check_config(config: Any, action: str) -> None:
    """``config`` must be a minilora ``LoraConfig`` (this file's or config.py's): PEFT's own config object,
    or another PEFT method's, is refused with what to import instead."""
    peft_type = getattr(getattr(config, "peft_type", None), "value", getattr(config, "peft_type", None))
    if not isinstance(config, _MiniLoraConfig) and isinstance(peft_type, str) and peft_type != "LORA":
        raise MiniLoraError(f"{action} got a {type(config).__name__}: {peft_type} is another PEFT method, and "
                            "minilora has LoRA only. Use minilora.compat.LoraConfig, or PEFT itself for "
                            f"{peft_type}.")
    if not isinstance(config, _MiniLoraConfig):
        raise MiniLoraError(f"{action} needs minilora.compat.LoraConfig, got "
                            f"{type(config).__module__}.{type(config).__qualname__}. "
                            "Import LoraConfig from minilora.compat as well.")


def resolved_targets(model: nn.Module, config: LoraConfig) -> Any:
    """What PEFT writes into the config when it injects: for ``target_modules=None`` (the
    architecture's default) and ``"all-linear"``, the set of names they stand for on this model (a
    default that is one regex string stays that string, as in PEFT), and for a list of 20 names or
    more, PEFT's shorter set of suffixes; otherwise the config's own value."""
    resolved = resolve_target_modules(model, config)
    if config.target_modules is None or is_all_linear(config.target_modules):
        return resolved if isinstance(resolved, str) else set(resolved)
    if resolved is not config.target_modules:  # a long list PEFT shortens (targets.condensed_targets)
        return set(resolved)
    return config.target_modules
