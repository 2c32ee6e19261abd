"""``ensure_weight_tying``: what PEFT does when an adapter touches a layer tied to the input embedding.

Many language models share one matrix between the input embedding (``embed_tokens``) and the output
layer (``lm_head``): ``lm_head.weight is embed_tokens.weight``. Training a copy of one of them (in
``modules_to_save``) or a LoRA on one of them unties the pair. PEFT's ``LoraConfig(ensure_weight_tying=
True)`` keeps them tied instead, by putting the adapter on the embedding and sharing it with the tied
layers; with ``ensure_weight_tying=False`` it warns. This file mirrors PEFT 0.21.2's check
(``peft/tuners/tuners_utils.py::BaseTuner._check_tied_modules``) and its warnings, word for word:

- the model ties nothing (no ``_tied_weights_keys``, or ``config.tie_word_embeddings`` is False) and
  ``ensure_weight_tying=True``: PEFT warns "no tied modules were found in the model" and injects as
  usual; so does minilora;
- tied, ``ensure_weight_tying=True``, but no ``embed_tokens`` / ``lm_head`` in ``modules_to_save`` or
  ``target_modules``: PEFT warns "no tied modules are added ..." and injects as usual; so does minilora;
- tied, ``ensure_weight_tying=False``, and one of them is adapted: PEFT warns "``ensure_weight_tying``
  is not set to True" and unties them; so does minilora;
- tied, ``ensure_weight_tying=True``, and one of them is adapted: PEFT moves the adapter to the
  embedding and shares it. In ``target_modules`` that is LoRA on an ``nn.Embedding``, which minilora
  does not have; in ``modules_to_save`` it is a trained copy shared between layers, not in minilora
  either. Both are MiniLoraErrors, raised before anything changes.

Which names count is PEFT's rule too: the *last part* of a name in ``modules_to_save`` or
``target_modules`` is ``embed_tokens`` or ``lm_head`` (for a regex string: the regex matches one of
those two words).
"""

from __future__ import annotations

import types
import warnings
from typing import Any

from torch import nn

from . import bounded_regex
from .config import MiniLoraError

EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")  # peft.utils.constants.EMBEDDING_LAYER_NAMES

NOT_ENSURED = ("Model has `tie_word_embeddings=True` and a tied layer is part of the adapter, "
               "but `ensure_weight_tying` is not set to True. "
               "This can lead to complications, for example when merging the adapter "
               "or converting your model to formats other than safetensors. "
               "Check the discussion here: https://github.com/huggingface/peft/issues/2777")
NONE_ADDED = ("You have requested `ensure_weight_tying`, but no tied modules are added in either "
              "`modules_to_save` or `target_modules`")
NONE_FOUND = "You have requested `ensure_weight_tying`, but no tied modules were found in the model"


def tied_module_names(model: nn.Module) -> list[str]:
    """The names of the modules whose weight is tied to the input embedding (``["lm_head"]`` for a
    tied causal LM), read from the model's ``_tied_weights_keys`` as PEFT 0.21.2 reads it
    (``peft/utils/other.py::_get_module_names_tied_with_embedding``): a list of parameter names
    (transformers 4) or a {tied: source} dict (transformers 5, collected from every submodule).
    ``config.tie_word_embeddings=False`` means nothing is tied."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "tie_word_embeddings", None) is False:
        return []
    keys = getattr(model, "_tied_weights_keys", None)
    if keys is None:
        return []
    if isinstance(keys, dict):
        if not hasattr(model, "get_input_embeddings"):
            raise MiniLoraError("The supplied model implements `_tied_weights_keys` as a dict but doesn't implement "
                                "'get_input_embeddings' so we can't determine which weights are tied to embeddings.")
        mapping: dict[str, str] = {}
        for prefix, module in model.named_modules():
            own = getattr(module, "_tied_weights_keys", None)
            if isinstance(own, dict) and own:
                mapping.update({(f"{prefix}.{k}" if prefix else k): (f"{prefix}.{v}" if prefix else v)
                                for k, v in own.items()})
        embedding = set(model.get_input_embeddings().parameters())
        shared = {name for name, param in model.named_parameters(remove_duplicate=False) if param in embedding}
        tied = [key for key, source in mapping.items() if source in shared]
    else:
        tied = list(keys)
    return sorted({name.rpartition(".")[0] for name in tied})


def _names_an_embedding_layer(names: Any) -> bool:
    """PEFT's test: a name whose last part is embed_tokens / lm_head (a regex string: that matches one)."""
    if isinstance(names, str):
        if bounded_regex.compile_error(names):
            return False  # (not a valid regex: inject's target check says so, in its own words)
        return any(bounded_regex.fullmatch(names, layer) for layer in EMBEDDING_LAYER_NAMES)
    return any(str(name).split(".")[-1] in EMBEDDING_LAYER_NAMES for name in (names or []))


def check_tied_modules(model: nn.Module, config: Any) -> None:
    """Warn as PEFT does about tied layers in this adapter, or refuse what minilora cannot tie.

    Raises:
        MiniLoraError: ``ensure_weight_tying=True`` on a model with tied layers, with ``embed_tokens``
            or ``lm_head`` in ``target_modules`` (PEFT puts LoRA on the Embedding) or in
            ``modules_to_save`` (PEFT shares one trained copy between the tied layers).
    """
    ensure = getattr(config, "ensure_weight_tying", False)
    if not isinstance(ensure, bool):
        raise MiniLoraError(f"ensure_weight_tying must be True or False (a bool), got {ensure!r}.")
    in_saved = _names_an_embedding_layer(getattr(config, "modules_to_save", None))
    in_targets = _names_an_embedding_layer(getattr(config, "target_modules", None))
    tied = tied_module_names(model)
    if not ensure:
        if tied and (in_saved or in_targets):
            warnings.warn(NOT_ENSURED, stacklevel=3)
        return
    if not tied:
        warnings.warn(NONE_FOUND, stacklevel=3)
    elif in_saved:
        raise MiniLoraError(
            f"ensure_weight_tying=True with a tied layer in modules_to_save (tied to the input embedding: {tied}): "
            "PEFT then trains one copy of the embedding and shares it with the tied layers, which minilora does "
            "not do. Leave ensure_weight_tying=False (PEFT then unties them, with a warning), or train the "
            "layer with LoRA instead.")
    elif in_targets:
        raise MiniLoraError(
            f"ensure_weight_tying=True with a tied layer in target_modules puts LoRA on the input Embedding "
            f"(PEFT moves the adapter there and shares it with {tied}); minilora has LoRA for nn.Linear and "
            "Conv1D only. Leave ensure_weight_tying=False (PEFT then unties them, with a warning), or leave "
            "embed_tokens / lm_head out of target_modules.")
    else:
        warnings.warn(NONE_ADDED, stacklevel=3)


def check_saved_tying(model: nn.Module, fields: dict[str, Any]) -> None:
    """``check_tied_modules`` for an adapter being loaded (``minilora.load_adapter`` and so compat's
    loading): PEFT runs the same check with the saved config's ``ensure_weight_tying``,
    ``modules_to_save`` and ``target_modules`` (``fields``: adapter_config.json as read) when it builds
    the adapter to load into."""
    check_tied_modules(model, types.SimpleNamespace(
        ensure_weight_tying=fields.get("ensure_weight_tying", False),
        modules_to_save=fields.get("modules_to_save"), target_modules=fields.get("target_modules")))
