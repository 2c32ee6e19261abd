"""Probes about several adapters in one model, merging in place, and the train/eval mode of new layers.

All on the tiny GPT-2 with LoRA on ``c_attn``. Two adapters, ``default`` and ``other``, get fixed
non-zero weights (``_fill``: a seeded draw per adapter), so each one moves the output and every
comparison below can tell them apart. A release that lacks an API answers ``absent (...)``.
"""

from __future__ import annotations

import copy
import warnings

import torch

from parity import twins
from parity.probing import IDS, absent, logits, probe, short, warnings_said

WEIGHTS = (0.5, 0.25)  # add_weighted_adapter(["default", "other"], WEIGHTS, ...)
MIXED_IDS = torch.arange(18).reshape(3, 6)
CLOSE = 1e-5  # relative: "the same output" (float32 rounding of a reordered sum is ~1e-7)


def _config(**fields):
    import peft

    fields = {"r": 8, "lora_alpha": 16, "target_modules": ["c_attn"], **fields}
    fields.setdefault("lora_dropout", 0.0)  # None by default in 0.3, which later code compares with 0.0
    return peft.LoraConfig(**fields)


def _fill(model, adapter: str, seed: int) -> None:
    """Give ``adapter``'s lora_A / lora_B weights a seeded draw (std 0.02), in parameter order."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name and f".{adapter}." in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)


def _single(base, seed: int):
    """The reference: a PEFT model whose only adapter holds what ``_fill(..., seed)`` draws."""
    import peft

    model = peft.get_peft_model(copy.deepcopy(base), _config())
    _fill(model, "default", seed)
    return model


def _two_adapters(base):
    """``default`` (seed 1) and ``other`` (seed 2), ``default`` active."""
    import peft

    torch.manual_seed(0)
    model = peft.get_peft_model(copy.deepcopy(base), _config())
    model.add_adapter("other", _config())
    _fill(model, "default", 1)
    _fill(model, "other", 2)
    return model


def _active(model) -> str:
    """The adapters the first LoRA layer will apply (the layer's own record, in every release)."""
    layer = next(module for module in model.modules() if hasattr(module, "lora_A"))
    active = getattr(layer, "active_adapters", None) or layer.active_adapter
    return ",".join([active] if isinstance(active, str) else list(active))


def _trainable(model) -> str:
    names = {name.split(".lora_A.")[1].split(".")[0] for name, parameter in model.named_parameters()
             if ".lora_A." in name and parameter.requires_grad}
    return ",".join(sorted(names)) or "none"


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return twins.max_rel_diff(a, b) < CLOSE


def _whose(out: torch.Tensor, references: dict[str, torch.Tensor]) -> str:
    """The name of the reference output ``out`` equals, or "none of them"."""
    return next((name for name, reference in references.items() if _same(out, reference)), "none of them")


def _references(base, model=None) -> dict[str, torch.Tensor]:
    """The outputs to recognise: each adapter alone, the base, and (given ``model``) both adapters summed."""
    references = {"default's": logits(_single(base, 1)), "other's": logits(_single(base, 2)),
                  "the base's": logits(base)}
    if model is not None:
        references["both summed"] = logits(_both(base, model))
    return references


def _both(base, model):
    """A one-adapter PEFT model equal to ``default`` + ``other`` of ``model``: A and B concatenated (r=16)."""
    import peft

    both = peft.get_peft_model(copy.deepcopy(base), _config(r=16, lora_alpha=32))  # the same alpha / r
    pairs = zip((m for m in model.modules() if hasattr(m, "lora_A")), (m for m in both.modules() if hasattr(m, "lora_A")))
    with torch.no_grad():
        for two, one in pairs:
            one.lora_A["default"].weight.copy_(torch.cat([two.lora_A[n].weight for n in ("default", "other")], 0))
            one.lora_B["default"].weight.copy_(torch.cat([two.lora_B[n].weight for n in ("default", "other")], 1))
    return both


@probe("add_adapter('other', config): which adapter is active afterwards, which are trainable, whose output")
def add_adapter(base) -> str:
    import peft

    model = peft.get_peft_model(copy.deepcopy(base), _config())
    if not hasattr(model, "add_adapter"):
        return "absent (no PeftModel.add_adapter)"
    model.add_adapter("other", _config())
    active, trainable = _active(model), _trainable(model)
    _fill(model, "default", 1)
    _fill(model, "other", 2)
    return f"active {active}; trainable {trainable}; output {_whose(logits(model), _references(base))}"


@probe("set_adapter('other'), then set_adapter with a list: active, trainable, whose output")
def set_adapter(base) -> str:
    model = _two_adapters(base)
    model.set_adapter("other")
    answer = f"active {_active(model)}; trainable {_trainable(model)}; output {_whose(logits(model), _references(base))}"
    try:
        model.base_model.set_adapter(["default", "other"])
        out = logits(model)
    except Exception as error:  # noqa: BLE001 - an older release takes one name only
        return f"{answer}; a list: {absent(error)}"
    return (f"{answer}; a list: active {_active(model)}, trainable {_trainable(model)}, "
            f"output {_whose(out, _references(base, model))}")


@probe("delete_adapter of the active adapter: what is active afterwards, are its layers gone")
def delete_adapter(base) -> str:
    model = _two_adapters(base)
    model.set_adapter("other")
    own = hasattr(type(model), "delete_adapter")  # not hasattr(model): PeftModel forwards unknown names
    owner, where = (model, "PeftModel") if own else (model.base_model, "only on the LoRA model")
    try:
        owner.delete_adapter("other")
    except Exception as error:  # noqa: BLE001
        return absent(error)
    left = any(".other." in name for name, _ in model.named_parameters())
    configs = ",".join(sorted(model.peft_config))
    return (f"{where}; active then {_active(model) or 'none'}; configs {configs}; "
            f"its weights {'still there' if left else 'removed'}")


def _delta(layer, adapter: str) -> torch.Tensor:
    """B A * scaling of one adapter of one PEFT layer (the orientation does not matter here)."""
    return layer.lora_B[adapter].weight @ layer.lora_A[adapter].weight * layer.scaling[adapter]


def _weighted(base, combination_type: str) -> str:
    model = _two_adapters(base)
    tuner = model.base_model
    if not hasattr(tuner, "add_weighted_adapter"):
        return "absent (no add_weighted_adapter)"
    try:
        tuner.add_weighted_adapter(["default", "other"], list(WEIGHTS), "mix", combination_type=combination_type)
    except TypeError as error:
        if combination_type != "linear" or "combination_type" not in str(error):
            return absent(error)
        tuner.add_weighted_adapter(["default", "other"], list(WEIGHTS), "mix")  # linear was the only kind
    except Exception as error:  # noqa: BLE001
        return absent(error) if "combination_type" in str(error) else f"raises {short(error)}"
    layers = [module for module in model.modules() if hasattr(module, "lora_A") and "mix" in module.lora_A]
    errors = []
    for layer in layers:
        wanted = sum(w * _delta(layer, name) for w, name in zip(WEIGHTS, ("default", "other")))
        errors.append(twins.max_rel_diff(_delta(layer, "mix"), wanted))
    worst = twins.largest(errors)
    rank = layers[0].lora_A["mix"].weight.shape[0]
    return f"rank {rank}; dW " + ("= 0.5 dW1 + 0.25 dW2" if worst < CLOSE else
                                  f"differs from 0.5 dW1 + 0.25 dW2 by rel {worst:.2f}")


@probe("add_weighted_adapter(..., combination_type='linear'): its rank, and dW against 0.5 dW1 + 0.25 dW2 (r=8 each)")
def weighted_linear(base) -> str:
    return _weighted(base, "linear")


@probe("add_weighted_adapter(..., combination_type='cat'): its rank, and dW against 0.5 dW1 + 0.25 dW2")
def weighted_cat(base) -> str:
    return _weighted(base, "cat")


@probe("add_weighted_adapter(..., combination_type='svd'): its rank, and dW against 0.5 dW1 + 0.25 dW2")
def weighted_svd(base) -> str:
    return _weighted(base, "svd")


@probe("model(ids, adapter_names=['default', 'other', '__base__']): one adapter per row of a batch")
def mixed_batch(base) -> str:
    model = _two_adapters(base)
    model.eval()
    try:
        with torch.no_grad():
            out = model(input_ids=MIXED_IDS, adapter_names=["default", "other", "__base__"]).logits
    except Exception as error:  # noqa: BLE001 - an older release passes the argument on to GPT-2
        return absent(error)
    wanted = [logits(_single(base, 1), MIXED_IDS[0:1]), logits(_single(base, 2), MIXED_IDS[1:2]),
              logits(base, MIXED_IDS[2:3])]
    wrong = [name for row, (name, reference) in enumerate(zip(("default", "other", "__base__"), wanted))
             if not _same(out[row:row + 1], reference)]
    return "each row gets its adapter ('__base__': the base model)" if not wrong else f"rows wrong: {wrong}"


@probe("merge_adapter() then unmerge_adapter(): outputs, a second merge, W0 afterwards")
def merge_unmerge(base) -> str:
    model = _two_adapters(base)
    if not hasattr(model.base_model, "merge_adapter"):
        return "absent (no merge_adapter)"
    adapted = logits(model)
    original = base.transformer.h[0].attn.c_attn.weight
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.merge_adapter()
        merged = logits(model)
        model.merge_adapter()
    said = warnings_said(caught)
    twice = _whose(logits(model), {"adapted": adapted, "dW added twice": logits(_twice(base))})
    model.unmerge_adapter()
    layer = next(module for module in model.modules() if hasattr(module, "lora_A"))
    weight = layer.base_layer.weight if hasattr(layer, "base_layer") else layer.weight
    return (f"merged: {_whose(merged, {'adapted output': adapted})}; merging again: "
            f"{f'warns {said[-1]!r}' if said else 'no warning'}, output {twice}; unmerged: "
            f"{_whose(logits(model), {'adapted output': adapted})}, W0 back within {twins.max_abs_diff(weight, original):.0e}")


@probe("with model.disable_adapter(): on a merged model: the output inside, and the weights after leaving it")
def disabled_while_merged(base) -> str:
    model = _single(base, 1)
    if not hasattr(model.base_model, "merge_adapter"):
        return "absent (no merge_adapter)"
    adapted, plain = logits(model), logits(base)
    model.merge_adapter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with model.disable_adapter():
                inside = logits(model)
        except Exception as error:  # noqa: BLE001 - refusing is an answer too
            return f"raises {short(error)}"
    said = warnings_said(caught)
    after = _whose(logits(model), {"adapted": adapted, "the base's": plain})
    return (f"inside: {_whose(inside, {'the base output': plain, 'the adapted output': adapted})}"
            f"{f' (warns {said[0]!r})' if said else ''}; after: output {after}")


def _twice(base):
    """The default adapter with 2 B: the output of a model that merged dW twice."""
    model = _single(base, 1)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "lora_B"):
                module.lora_B["default"].weight.mul_(2)
    return model


@probe("get_peft_model on a model in eval() mode, lora_dropout=0.5: mode of the new LoRA layers, dropout active?")
def new_layers_mode(base) -> str:
    import peft

    model = peft.get_peft_model(copy.deepcopy(base).eval(), _config(lora_dropout=0.5))
    _fill(model, "default", 1)
    dropouts = [module.lora_dropout["default"] for module in model.modules() if hasattr(module, "lora_dropout")]
    mode = "train" if all(d.training for d in dropouts) else "eval" if not any(d.training for d in dropouts) else "mixed"
    torch.manual_seed(0)
    with torch.no_grad():
        first, second = model(input_ids=IDS).logits, model(input_ids=IDS).logits
    active = "dropout active (two calls differ)" if not torch.equal(first, second) else "no dropout (two calls equal)"
    return f"LoRA layers in {mode} mode, model.training={model.training}: {active}"



API = {  # what issue 11 lists, by where PEFT users call it
    "PeftModel": ("add_adapter", "set_adapter", "delete_adapter", "load_adapter", "disable_adapter",
                  "get_layer_status", "get_model_status", "set_requires_grad"),
    "LoRA model": ("add_weighted_adapter", "merge_adapter", "unmerge_adapter", "delete_adapter",
                   "enable_adapter_layers", "disable_adapter_layers", "merge_and_unload", "unload"),
}


@probe("which of PEFT's several-adapter methods the release's classes define (PeftModel, and its LoRA model)")
def adapter_api(base) -> str:
    import peft

    model = peft.get_peft_model(copy.deepcopy(base), _config())
    classes = {"PeftModel": type(model), "LoRA model": type(model.base_model)}
    missing = {where: [name for name in names if not hasattr(classes[where], name)] for where, names in API.items()}
    return "; ".join(f"{where} lacks {', '.join(names)}" for where, names in missing.items() if names) or "all of them"


@probe("save_pretrained of a model with adapters 'default' and 'other': the files, and loading 'other' back")
def adapter_files_several(base) -> str:
    import os
    import tempfile

    import peft

    model = _two_adapters(base)
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        files = sorted(os.path.relpath(os.path.join(folder, name), directory)
                       for folder, _, names in os.walk(directory) for name in names if name != "README.md")
        try:
            loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), os.path.join(directory, "other"))
            back = _whose(logits(loaded), {"other's output": logits(_single(base, 2))})
        except Exception as error:  # noqa: BLE001
            back = f"raises {short(error)}"
    return f"{' + '.join(files)}; other/ loads as: {back}"
