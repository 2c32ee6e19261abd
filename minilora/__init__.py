"""minilora: LoRA from scratch, small enough to read in an afternoon.

    h = W0 x + (lora_alpha / r) * B A x

Read in this order. The lesson (LoRA itself, one adapter):
    config.py   what to adapt: r, lora_alpha, target_modules, dropout
    layer.py    the math: LoraLinear wraps nn.Linear / Conv1D; forward, delta_weight, merge, unmerge
    targets.py  which layers a config selects (PEFT's defaults, "all-linear", patterns)
    inject.py   putting the layers into a model, freezing, merge_and_unload, unload, disabled
    params.py   counting trainable parameters
    adapters.py and adapter_config.py   adapter files in PEFT's format: the keys, save_adapter, load_adapter

Beyond the lesson, each in its own file:
    saved_modules.py (modules trained in full), multi.py, weighted.py and mixed.py (several adapters),
    adapter_files.py (reading an adapter directory once, refusing hostile or mismatched files),
    adapter_checks.py (does an adapter fit the model: keys, shapes, dtypes, values),
    files.py (crash-safe writes), bounded_regex.py (regexes from files, with a time bound),
    fused.py (faster forward paths), cli.py (the `minilora` command), models.py (the embedded GPT-2),
    text.py (an offline text and tokenizer), spectrum.py, demo.py.

PEFT's API as a drop-in (minilora.compat; read compat.py first): compat.py is the PeftModel wrapper,
compat_config.py PEFT's config fields, compat_adapters.py its base_model, compat_loading.py what
loading does around it, compat_state_dict.py PEFT's state-dict functions, compat_auto.py its
AutoPeftModel classes, compat_tying.py ensure_weight_tying, compat_trainer.py how transformers.Trainer
comes to treat the wrapper as PEFT's; peft_attributes.py holds the names PEFT's own code reads on a
config and a layer.
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
