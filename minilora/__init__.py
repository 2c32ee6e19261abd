"""minilora: LoRA from scratch, small enough to read in an afternoon.

    h = W0 x + (lora_alpha / r) * B A x

Read in this order: config.py (what to adapt), layer.py (the math), inject.py (putting it into a
model), params.py (counting).
"""

from .config import LoraConfig, MiniLoraError
from .inject import (
    disabled,
    find_targets,
    inject,
    lora_layers,
    mark_only_lora_as_trainable,
    merge,
    merge_and_unload,
    unload,
    unmerge,
)
from .layer import LoraLinear
from .models import load_model
from .params import (
    count_parameters,
    layer_counts,
    layer_table,
    print_trainable_parameters,
    trainable_parameters_line,
)

__all__ = [
    "LoraConfig",
    "LoraLinear",
    "MiniLoraError",
    "count_parameters",
    "disabled",
    "find_targets",
    "inject",
    "layer_counts",
    "layer_table",
    "load_model",
    "lora_layers",
    "mark_only_lora_as_trainable",
    "merge",
    "merge_and_unload",
    "print_trainable_parameters",
    "trainable_parameters_line",
    "unload",
    "unmerge",
]
