"""minilora: LoRA from scratch, small enough to read in an afternoon.

    h = W0 x + (lora_alpha / r) * B A x

Read in this order: config.py (what to adapt), layer.py (the math), targets.py (which layers),
inject.py (putting it into a model), saved_modules.py (modules trained in full), multi.py,
weighted.py and mixed.py (several adapters), params.py (counting), adapters.py and
adapter_config.py (adapter files in PEFT's format; files.py writes them crash-safely,
bounded_regex.py matches their regexes with a time bound), compat.py (PEFT's API: the PeftModel
wrapper; compat_config.py PEFT's config fields, compat_adapters.py its base_model, compat_loading.py
what loading does around it, compat_state_dict.py PEFT's state-dict functions, compat_auto.py its
AutoPeftModel classes; peft_attributes.py holds the names PEFT's own code reads on a config and a
layer), fused.py (faster forward paths), cli.py (the `minilora` command).
"""

from .adapters import load_adapter, save_adapter
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
from .fused import FORWARD_PATHS, forward_path, set_forward_path
from .layer import LoraLinear
from .mixed import mixed_batch
from .models import load_model
from .multi import (
    active_adapters,
    add_adapter,
    adapter_names,
    delete_adapter,
    enable_adapters,
    layer_status,
    model_status,
    save_adapters,
    set_adapter,
)
from .weighted import add_weighted_adapter
from .params import (
    count_parameters,
    layer_counts,
    layer_table,
    print_trainable_parameters,
    trainable_parameters_line,
)

__all__ = [
    "FORWARD_PATHS",
    "LoraConfig",
    "LoraLinear",
    "MiniLoraError",
    "active_adapters",
    "adapter_names",
    "add_adapter",
    "add_weighted_adapter",
    "count_parameters",
    "delete_adapter",
    "disabled",
    "enable_adapters",
    "find_targets",
    "forward_path",
    "inject",
    "layer_counts",
    "layer_status",
    "layer_table",
    "load_adapter",
    "load_model",
    "lora_layers",
    "mark_only_lora_as_trainable",
    "merge",
    "mixed_batch",
    "merge_and_unload",
    "model_status",
    "print_trainable_parameters",
    "save_adapter",
    "save_adapters",
    "set_adapter",
    "set_forward_path",
    "trainable_parameters_line",
    "unload",
    "unmerge",
]
