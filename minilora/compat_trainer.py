"""``transformers.Trainer`` treats PEFT's models in its own way; this makes it treat compat's the same.

What Trainer does for a PEFT model and not for another module (transformers 5.24, trainer.py):

- ``label_names`` and the batch columns it keeps come from *your* model's forward, so ``evaluate()``
  reports ``eval_loss`` even without a task_type (compat's wrapper has ``forward(*args, **kwargs)``);
- a checkpoint (``checkpoint-N/``) and ``trainer.save_model()`` hold what ``model.save_pretrained``
  writes, the adapter only, instead of the whole state dict (which GPT-2's tied weights cannot even be
  written as: "Some tensors share memory");
- ``resume_from_checkpoint`` and ``load_best_model_at_end`` read the adapter back with
  ``model.load_adapter(checkpoint, name)``;
- NEFTune's noise goes on your model's embedding; DeepSpeed leaves the frozen weights out.

Trainer decides all of this with ``isinstance`` on peft's classes, in two places:

    transformers.trainer_utils._is_peft_model(model):
        is_peft_available() and isinstance(model, (PeftModel, PeftMixedModel))
    transformers.trainer.Trainer._save(...):
        isinstance(self.model, (PreTrainedModel, PeftModel))     (PeftModel only if is_peft_available())

Every other place calls ``_is_peft_model`` (imported by name into trainer.py, integrations/neftune.py,
...) or ``unwrap_peft_model``, which calls it. ``PeftModel``, ``PeftMixedModel`` and
``is_peft_available`` are names in the globals of those two modules. ``recognise_compat_models()``
adds compat's ``PeftModel`` to the ``PeftModel`` name in both, as a tuple (``isinstance`` accepts
nested tuples): a real PEFT model is recognised exactly as before, and compat's now too. Without
peft installed, the two modules never imported it and ``is_peft_available()`` says False: ``PeftModel``
becomes compat's class, ``PeftMixedModel`` an empty tuple, and their ``is_peft_available`` (those two
modules' own name for it, nothing else in transformers) says True, as PEFT's ``PeftModel`` is there.

Why this way, and not another:

- patching the names that ``_is_peft_model`` reads reaches every module's copy of the function at once,
  including modules imported later; replacing ``_is_peft_model`` itself would have to find each copy;
- subclassing peft's ``PeftModel`` needs peft installed and brings its behaviour with it;
- wrapping ``Trainer._save`` or ``_load_from_checkpoint`` would copy transformers' code into minilora.

When: the first time a compat wrapper is built (``PeftModel.__init__`` and ``from_pretrained``), if
transformers is installed: it imports ``transformers.trainer`` (as ``transformers.Trainer`` would on
first use), so that a Trainer made later, in any order of imports, sees the new names. A wrapper is the
only thing these names must recognise, so nothing happens before there is one.

Not covered: FSDP (accelerate's ``is_peft_model`` and its adapter-only state dicts call peft's own
functions); tests/test_compat_trainer.py checks the rest against PEFT, with and without peft installed.
"""

from __future__ import annotations

import importlib
import importlib.util
import types
from typing import Any

_recognised = False


def _peft_api_available() -> bool:
    """transformers' ``is_peft_available``, as Trainer's two modules see it once minilora.compat is in
    use without peft: True, since a ``PeftModel`` class (compat's) is there for them to use."""
    return True


def _widened(old: Any, compat_class: type) -> tuple:
    """``old`` (a class, a tuple of classes, or None when peft is not installed) with ``compat_class``."""
    if old is None:
        return (compat_class,)
    old = old if isinstance(old, tuple) else (old,)
    return old if compat_class in old else (*old, compat_class)


def recognise_compat_models(compat_class: type) -> None:
    """Make ``transformers.Trainer`` handle ``compat_class`` instances as PEFT models (see above).
    Once per process; nothing when transformers is not installed."""
    global _recognised
    if _recognised or importlib.util.find_spec("transformers") is None:
        return
    modules: list[types.ModuleType] = [importlib.import_module("transformers.trainer_utils"),
                                       importlib.import_module("transformers.trainer")]
    for module in modules:
        peft_installed = hasattr(module, "PeftModel")  # (both modules import it only when peft is installed)
        module.PeftModel = _widened(getattr(module, "PeftModel", None), compat_class)
        if not peft_installed:
            module.is_peft_available = _peft_api_available
            if module.__name__.endswith("trainer_utils"):
                module.PeftMixedModel = ()
    _recognised = True
