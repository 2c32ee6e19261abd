"""PEFT's ``LoraModel``: ``peft_model.base_model``, the layer between compat's wrapper and your model.

    peft_model = get_peft_model(model, config)   # compat.PeftModel
    peft_model.base_model                        # LoraModel (this file)
    peft_model.base_model.model                  # your model, with LoRA layers injected in place

PEFT keeps its model-wide adapter methods here (several adapters, merging, switching the adapters
off) and its ``PeftModel`` reaches them through ``__getattr__``; compat does the same, so scripts
that call ``peft_model.base_model.set_adapter([...])`` or ``peft_model.merge_adapter()`` run
unchanged. The work is done by minilora's own functions (multi.py, inject.py, weighted.py) on
``self.model``; where PEFT warns, these warn with PEFT's words, and where PEFT raises ValueError
for a bad argument, they raise MiniLoraError (a ValueError too) before anything changes.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

from torch import nn

from . import multi
from .adapter_config import check_regular_file
from .config import MiniLoraError
from .files import write_atomically
from .inject import adapter_configs, check_mergeable, lora_layers, merge_and_unload, require_lora_layers, unload
from .saved_modules import saved_modules
from .targets import model_config
from .weighted import add_weighted_adapter


class LoraModel(nn.Module):
    """Holds the injected model as ``self.model`` (so state-dict keys start ``base_model.model.``, as
    in PEFT) and PEFT's ``LoraModel`` methods. Attributes it does not have are the model's."""

    prefix = "lora_"  # PEFT's: every adapter parameter's name contains it

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)  # parameters, buffers and submodules (self.model)
        except AttributeError:
            if name == "model":  # not built yet (e.g. while unpickling): no recursion
                raise
            return getattr(self.model, name)

    # ----------------------------------------------------------------------------------------
    # Which adapters there are, and which are active
    # ----------------------------------------------------------------------------------------
    @property
    def peft_config(self) -> dict:
        """{adapter name: its LoraConfig}, the live dict minilora keeps on the model."""
        return adapter_configs(self.model)

    @property
    def active_adapters(self) -> list[str]:
        """The adapters forward adds, in order ([] once the LoRA layers are gone)."""
        return multi.active_adapters(self.model) if any(True for _ in lora_layers(self.model)) else []

    @property
    def active_adapter(self) -> str | list[str]:
        """The active adapter's name, or the list of them when several are active (PEFT's convention)."""
        active = self.active_adapters
        return active[0] if len(active) == 1 else active

    @property
    def targeted_module_names(self) -> list[str]:
        """The names (in the model) of the layers that hold an adapter."""
        return [name for name, _ in lora_layers(self.model)]

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """The active adapters: one name or a list. Their A and B train (unless ``inference_mode``)."""
        multi.set_adapter(self.model, adapter_name, inference_mode=inference_mode)

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        """Switch requires_grad of these adapters' A and B (and their saved modules), leaving the rest alone."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        multi._check_known(self.model, names, "set_requires_grad")
        for _, layer in lora_layers(self.model):
            for name in names:
                if name in layer.lora_A:
                    layer.lora_A[name].requires_grad_(requires_grad)
                    layer.lora_B[name].requires_grad_(requires_grad)
        for _, wrapper in saved_modules(self.model):
            for name in names:
                if name in wrapper.modules_to_save:
                    wrapper.modules_to_save[name].requires_grad_(requires_grad)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter (not while it is merged); if it was the active one, PEFT's choice of the next."""
        if adapter_name not in self.peft_config:
            raise MiniLoraError(f"Adapter {adapter_name} does not exist (the model has {list(self.peft_config)}).")
        multi.delete_adapter(self.model, adapter_name)

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "svd", svd_rank: Optional[int] = None, svd_clamp: Any = None,
                             svd_full_matrices: bool = True, svd_driver: Optional[str] = None, density: Any = None,
                             majority_sign_method: str = "total") -> None:
        """A new adapter from a weighted combination of others: ``linear``, ``cat`` or ``svd`` (weighted.py)."""
        if density is not None:
            raise MiniLoraError("add_weighted_adapter: density is for PEFT's ties / dare / magnitude_prune "
                                "combinations, which minilora does not have (it has linear, cat and svd).")
        from .compat_loading import after_pefts_injection, lora_layer_ids

        new = adapter_name not in self.peft_config
        before = lora_layer_ids(self.model)
        add_weighted_adapter(self.model, adapters, weights, adapter_name, combination_type, svd_rank, svd_clamp,
                             svd_full_matrices, svd_driver)
        if new:  # PEFT injects the new adapter as add_adapter does: merged layers unmerged, its modules in train mode
            after_pefts_injection(self.model, adapter_name, before)
            # then PEFT freezes the new adapter by a substring test on every parameter's name (peft/utils/other.py,
            # _freeze_adapter): a name found inside other names ("w" in ".weight") freezes those parameters too
            for name, param in self.model.named_parameters():
                if adapter_name in name:
                    param.requires_grad_(False)

    # ----------------------------------------------------------------------------------------
    # Merging, and switching the adapters off
    # ----------------------------------------------------------------------------------------
    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        """Fold the active adapters (or ``adapter_names``) into W0, layer by layer, keeping A and B
        (``unmerge_adapter`` takes them out again; what TRL calls to sync weights into vLLM).
        Warns as PEFT when merged already. Every layer is checked first (``safe_merge``: its merged
        weight is finite; a ``lora_bias`` adapter: the layer has a bias), so a refusal comes before any
        layer changes (PEFT's merges layer by layer and raises at the first layer it cannot merge,
        leaving the layers before it merged)."""
        if isinstance(adapter_names, str):
            raise MiniLoraError(f"adapter_names should be a list of strings, got {adapter_names!r}.")
        self._warn_tied_targets()
        layers = require_lora_layers(self.model, "merge_adapter")
        check_mergeable(layers, adapter_names, safe=safe_merge)
        for _, layer in layers:
            layer.merge(safe=safe_merge, adapter_names=adapter_names)

    def unmerge_adapter(self) -> None:
        """Take every merged adapter out of W0 again (PEFT's warning if none is merged)."""
        for _, layer in require_lora_layers(self.model, "unmerge_adapter"):
            layer.unmerge()

    def disable_adapter_layers(self) -> None:
        """The base model's outputs; no adapter requires grad. Warns as PEFT when biases were trained."""
        for name in self.active_adapters:
            bias = getattr(self.peft_config.get(name), "bias", "none")
            if bias != "none":
                warnings.warn(f"Careful, disabling adapter layers with bias configured to be '{bias}' does not "
                              "produce the same output as the base model would without adaption.", stacklevel=3)
        multi.enable_adapters(self.model, False)

    def enable_adapter_layers(self) -> None:
        """The adapters are back; the active ones require grad."""
        multi.enable_adapters(self.model, True)

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: Optional[list[str]] = None) -> nn.Module:
        """Fold dW (of the active adapters, or ``adapter_names``) into W0 and put the plain layers back:
        returns your model, without LoRA."""
        self._warn_tied_targets()
        return merge_and_unload(self.model, safe=safe_merge, adapter_names=adapter_names)

    def _warn_tied_targets(self) -> None:
        """PEFT's warning before a merge (its LoraModel._check_merge_allowed) when the config says
        ``tie_word_embeddings`` and a LoRA layer is named ``lm_head`` or ``embed_tokens`` (its
        EMBEDDING_LAYER_NAMES; by name, as PEFT). minilora merges such a layer into a copy of the shared
        weight (README), but says what PEFT says."""
        tied = model_config(self.model).get("tie_word_embeddings")  # (a plain dict config too, as PEFT's)
        tied_target_modules = [name for name in self.targeted_module_names
                               if name.split(".")[-1] in ("embed_tokens", "lm_head")] if tied else []
        if tied_target_modules:
            warnings.warn(
                f"Model with `tie_word_embeddings=True` and the {tied_target_modules=} are part of the adapter. "
                "This can lead to complications. "
                "You can opt to merge the adapter after cloning the weights (to untie the embeddings). "
                "You can untie the embeddings by loading the model with `tie_word_embeddings=False`. For example:"
                + _UNTIE_EXAMPLE, stacklevel=3)

    def unload(self) -> nn.Module:
        """Put the plain layers back without merging: returns your model as it was before LoRA. As PEFT's,
        a layer merged already goes back as it is, W0 + dW (PEFT's unload does not unmerge)."""
        tied = [name for name, layer in lora_layers(self.model) if layer.merged and layer.untied_weight is not None]
        if tied:  # PEFT merged into the shared weight (the input embedding too); minilora into a copy (README)
            raise MiniLoraError(f"unload() of merged layers whose weight is tied ({tied}): PEFT's unload keeps W0 + dW "
                                "in the weight it shares (the input embedding too), minilora merged into a copy of "
                                "its own. Call unmerge_adapter() first for the base model, or merge_and_unload().")
        return unload(self.model, unmerge=False)


_UNTIE_EXAMPLE = """
```python
from transformers import AutoModelForCausalLM

# Load original tied model
model = AutoModelForCausalLM.from_pretrained("google/gemma-2-2b-it", tie_word_embeddings=False)

# Set the randomly initialized lm_head to the previously tied embeddings
model.lm_head.weight.data = model.model.embed_tokens.weight.data.clone()

# Save the untied model
untied_model_dir = "dir/for/untied/model"
model.save_pretrained(untied_model_dir)
model.config.save_pretrained(untied_model_dir)

# Now use the original model but in untied format
model = AutoModelForCausalLM.from_pretrained(untied_model_dir)
```
"""


def write_model_card(model: nn.Module, directory: Path) -> None:
    """README.md as PEFT's ``create_or_update_model_card`` writes it for your ``model``: an existing
    card is kept and updated; its metadata says ``library_name: peft``, the tags and the base model."""
    from importlib.metadata import PackageNotFoundError, version

    from huggingface_hub import ModelCard, ModelCardData

    try:
        __version__ = version("minilora")
    except PackageNotFoundError:  # run from a source tree
        __version__ = "(source)"

    path = directory / "README.md"
    card = _existing_card(path) if path.exists() else ModelCard.from_template(ModelCardData())
    card.data["library_name"] = "peft"
    all_tags = set(getattr(model, "model_tags", None) or [])
    if hasattr(model, "config") and type(model).__module__.startswith("transformers"):
        all_tags.add("transformers")
    all_tags.add("lora")
    name_or_path = getattr(model, "name_or_path", None)
    if name_or_path is not None:
        all_tags.add(f"base_model:adapter:{name_or_path}")
    card.data["tags"] = sorted(all_tags)
    configs = adapter_configs(model)
    first = next(iter(configs.values()), None)
    task = getattr(getattr(first, "task_type", None), "value", getattr(first, "task_type", None))
    if not card.data.pipeline_tag and task == "CAUSAL_LM":
        card.data.pipeline_tag = "text-generation"
    config_dict = model.config.to_dict() if hasattr(getattr(model, "config", None), "to_dict") else {}
    if "_name_or_path" in config_dict:
        card.data["base_model"] = config_dict["_name_or_path"]
    lines = card.text.splitlines()
    line = f"- minilora {__version__} (adapters in PEFT's format)"
    if line not in lines:
        heading = "### Framework versions"
        if heading in lines:
            lines.insert(lines.index(heading) + 2, line)
        else:
            lines.append(f"{heading}\n\n{line}")
    card.text = "\n".join(lines)
    write_atomically(path, str(card).encode("utf-8"))  # (replaces a symlink there, never writes through it)


def _existing_card(path: Path):
    """The model card in ``path`` (a README.md a save left, or yours), read as PEFT reads it."""
    from huggingface_hub import ModelCard

    check_regular_file(path)
    try:
        return ModelCard.load(path)
    except Exception as error:  # (its YAML header can fail in many ways)
        raise MiniLoraError(f"{path} could not be read as a model card ({type(error).__name__}: {error}). Fix or "
                            "remove it, then save again.") from None
