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
modules' own name for it, nothing else in transformers) says True, since a ``PeftModel`` (compat's) is
there. These are changes to transformers' modules for the whole process, made once and never undone;
they change nothing for a model that is neither PEFT's nor compat's.

Why this way, and not another:

- patching the names that ``_is_peft_model`` reads reaches every module's copy of the function at once,
  including modules imported later; replacing ``_is_peft_model`` itself would have to find each copy;
- subclassing peft's ``PeftModel`` needs peft installed and brings its behaviour with it;
- wrapping ``Trainer._save`` or ``_load_from_checkpoint`` would copy transformers' code into minilora.

When: the first time a compat wrapper is built (``PeftModel.__init__`` and ``from_pretrained``), if
transformers is installed: it imports ``transformers.trainer`` (as ``transformers.Trainer`` would on
first use), so that a Trainer made later, in any order of imports, sees the new names. A wrapper is the
only thing these names must recognise, so nothing happens before there is one. Then it asks Trainer's
own ``_is_peft_model`` about that wrapper: a transformers whose Trainer looks elsewhere is left as it
was, with a warning that says what that means, rather than half changed.

Not covered: FSDP (accelerate's ``is_peft_model`` and its adapter-only state dicts call peft's own
functions), and trainers built on Trainer that keep their own ``isinstance`` checks (TRL's).
tests/test_compat_trainer.py checks the rest against PEFT, with and without peft installed.
"""

from __future__ import annotations

import importlib
import importlib.util
import warnings
from typing import Any

_recognised = False
NOT_RECOGNISED = ("transformers {version}{without}: its Trainer could not be made to treat minilora.compat's PeftModel "
                  "as a PEFT model (minilora/compat_trainer.py was written for transformers 5.24), so its checkpoints "
                  "would hold the whole state dict rather than the adapter, and resume_from_checkpoint / "
                  "load_best_model_at_end would not load the adapter. Train with save_strategy='no' and save with "
                  "model.save_pretrained(...).")


def _peft_api_available() -> bool:
    """transformers' ``is_peft_available``, as Trainer's two modules see it once minilora.compat is in
    use without peft: True, since a ``PeftModel`` class (compat's) is there for them to use."""
    return True


def _widened(old: Any, compat_class: type) -> tuple:
    """``old`` (a class or a tuple of classes) with ``compat_class``."""
    old = old if isinstance(old, tuple) else (old,)
    return old if compat_class in old else (*old, compat_class)


def recognise_compat_models(compat_class: type, wrapper: Any) -> None:
    """Make ``transformers.Trainer`` handle ``compat_class`` (compat's PeftModel) as a PEFT model, and
    check that it does with ``wrapper``, an instance. Once per process; nothing without transformers
    (or without what its Trainer needs). A Trainer this does not fit (another layout of these
    modules: transformers 4 without peft asks for peft's version) is left as it was, with a warning."""
    global _recognised
    if _recognised or importlib.util.find_spec("transformers") is None:
        return
    _recognised = True
    try:
        modules = [importlib.import_module("transformers.trainer_utils"),
                   importlib.import_module("transformers.trainer")]
    except Exception:  # (e.g. accelerate, which Trainer needs, is missing: then there is no Trainer to tell)
        return
    names = ("PeftModel", "PeftMixedModel", "is_peft_available")
    before = [{name: vars(module)[name] for name in names if name in vars(module)} for module in modules]
    peft_installed = hasattr(modules[1], "PeftModel")  # (both modules import it only when peft is installed)
    for module in modules:
        if peft_installed and hasattr(module, "PeftModel"):
            module.PeftModel = _widened(module.PeftModel, compat_class)
        elif not peft_installed:
            module.PeftModel, module.PeftMixedModel = (compat_class,), ()
            module.is_peft_available = _peft_api_available
    checks = [module._is_peft_model for module in modules if hasattr(module, "_is_peft_model")]
    try:
        recognised = bool(checks) and all(check(wrapper) for check in checks) and \
            isinstance(wrapper, modules[1].PeftModel)  # (what Trainer._save asks)
    except Exception:  # e.g. transformers 4's _is_peft_model, without peft: importlib.metadata.version("peft")
        recognised = False
    if not recognised:
        for module, saved in zip(modules, before):
            for name in names:
                if name in saved:
                    setattr(module, name, saved[name])
                elif hasattr(module, name):
                    delattr(module, name)
        from transformers import __version__

        warnings.warn(NOT_RECOGNISED.format(version=__version__, without="" if peft_installed else " without peft"),
                      stacklevel=4)
