"""The "adapters" check: several adapters per model, minilora against PEFT on one twin pair.

On deep copies of the pair (so the other checks see the pair unchanged), both sides get a second
adapter "other" from the same seed, then:

- added adapter: same seed -> the same A and B as PEFT's ``add_adapter``;
- two active: outputs with ``set_adapter(["default", "other"])`` (equal non-zero adapters);
- weighted cat / linear / svd: ``add_weighted_adapter`` (cat and linear PEFT's operations, so bitwise;
  svd compared by dW = B A within ``SVD_TOLERANCE``, see below);
- mixed batch: one adapter per row (``adapter_names``, with "__base__");
- several-adapter files: PEFT's layout (default at the root, others in sub-folders) both ways;
- merge_adapter / unmerge_adapter: W0 after merging both adapters, and after unmerging.

Tolerances are the other checks' (bitwise on the CPU), except svd: PEFT and minilora run the same
LAPACK SVD on the same float32 dW, but a backward-stable float32 SVD rebuilds U_k S_k V_k^T only to
about c * eps * ||dW|| (eps = 1.2e-7, c a small multiple of the matrix size); 1e-5 of max |dW| is
above that and far below a real error (a wrong weight, scaling or transpose moves dW by O(1)).
"""

from __future__ import annotations

import copy
import inspect
import warnings
from pathlib import Path

import torch

import minilora
from minilora.layer import LoraLinear
from parity import twins
from parity.checks import rel_err, tolerance, worst
from parity.grid import Pair, make_inputs
from parity.results import FAIL, Result, within

SVD_TOLERANCE = 1e-5
CHECK = "adapters"


def _peft_layers(model) -> dict:
    return {name.removeprefix(twins.PEFT_PREFIX): module for name, module in model.named_modules()
            if hasattr(module, "lora_A") and hasattr(module, "get_delta_weight")}


def _output(model, pair: Pair, inputs, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        if pair.case.architecture is not None:
            return model(**inputs, **kwargs).logits
        if pair.case.model != "linear":
            return model(input_ids=inputs, **kwargs).logits
        return model(inputs, **kwargs)


def _second_config(pair: Pair) -> minilora.LoraConfig:
    """The second adapter: the first one's targets and r, another alpha (so scalings differ)."""
    config = pair.case.config()
    config.lora_alpha = config.lora_alpha * 1.5
    return config


def twins_with_two_adapters(pair: Pair) -> tuple:
    """(mini, peft): copies of the pair with "other" added from the same seed; returns also the
    worst (rel err, name, abs err) of the new adapter's A and B right after adding (its init)."""
    mini, peft_model = copy.deepcopy(pair.mini), copy.deepcopy(pair.peft)
    config = _second_config(pair)
    torch.manual_seed(7)
    minilora.add_adapter(mini, "other", config)
    torch.manual_seed(7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.add_adapter("other", twins.peft_config(config))
    peft_params = dict(peft_model.named_parameters())
    named = [(name, param, peft_params[twins.peft_key(name)]) for name, param in mini.named_parameters()
             if ".other." in name]
    init = worst(named)
    twins.randomize_adapters(mini, seed=3)  # every adapter: equal non-zero A and B on both sides
    twins.copy_adapters_to_peft(mini, peft_model)
    return mini, peft_model, init


def check_adapters(pair: Pair, directory: Path) -> list[Result]:
    """The rows listed in the module docstring."""
    label, device, tol = pair.label, pair.device, tolerance(pair)
    rows = []
    mini, theirs, (init_error, init_name, _) = twins_with_two_adapters(pair)
    rows.append(within(CHECK, label, device, "max rel err (added adapter A, B)", init_error, 0.0 if device == "cpu"
                       else tol, f"same seed as PEFT's add_adapter; worst {init_name}"))
    minilora.set_adapter(mini, ["default", "other"])
    theirs.base_model.set_adapter(["default", "other"])
    mini.eval()
    theirs.eval()
    rows.append(within(CHECK, label, device, "max rel err (two active adapters)",
                       rel_err(_output(mini, pair, pair.inputs), _output(theirs, pair, pair.inputs)), tol))
    rows.extend(_weighted_rows(pair, mini, theirs, tol))
    rows.append(_mixed_batch_row(pair, mini, theirs, tol))
    rows.append(_files_row(pair, mini, theirs, Path(directory), tol))
    rows.extend(_merge_rows(pair, mini, theirs, tol))  # last: W0 + dW - dW is W0 only up to rounding
    return rows


def _weighted_rows(pair: Pair, mini, theirs, tol: float) -> list[Result]:
    label, device = pair.label, pair.device
    rows = []
    for combination in ("cat", "linear", "svd"):
        name = f"weighted-{combination}"
        torch.manual_seed(11)
        minilora.add_weighted_adapter(mini, ["default", "other"], [0.7, -1.3], name, combination_type=combination)
        torch.manual_seed(11)
        theirs.add_weighted_adapter(["default", "other"], [0.7, -1.3], name, combination_type=combination)
        peft_layers = _peft_layers(theirs)
        if combination == "svd":  # dW = B A: the factors themselves are defined up to signs
            named = [(n, layer.delta_weight(name), peft_layers[n].get_delta_weight(name))
                     for n, layer in minilora.lora_layers(mini) if name in layer.lora_A]
            error, worst_name, _ = worst(named)
            rows.append(within(CHECK, label, device, "max rel err (weighted svd dW)", error,
                               max(SVD_TOLERANCE, tol), f"worst {worst_name}"))
            continue
        peft_params = dict(theirs.named_parameters())
        named = [(n, p, peft_params[twins.peft_key(n)]) for n, p in mini.named_parameters() if f".{name}." in n]
        error, worst_name, _ = worst(named)
        rows.append(within(CHECK, label, device, f"max rel err (weighted {combination} A, B)", error, tol,
                           f"worst {worst_name}"))
    return rows


def _require_peft(feature: str, available: bool) -> None:
    """A PEFT release without ``feature`` gets an N/A row, not a FAIL: some of these calls fail in the
    model's own ``forward`` (``adapter_names`` reaches it as an unknown keyword), outside PEFT's code."""
    if not available:
        import peft

        raise twins.UnsupportedByPeft(f"peft {peft.__version__} has no {feature}")


def _mixed_batch_row(pair: Pair, mini, theirs, tol: float) -> Result:
    """Three rows, three adapters: "other", none, "default"."""
    import peft
    from packaging.version import Version

    _require_peft("mixed batches (adapter_names, from 0.10)", Version(peft.__version__) >= Version("0.10"))
    inputs, _ = make_inputs(pair.case, pair.base, pair.device, seed=5, batch=3)
    names = ["other", "__base__", "default"]
    with minilora.mixed_batch(mini, names):
        ours = _output(mini, pair, inputs)
    expected = _output(theirs, pair, inputs, adapter_names=names)
    return within(CHECK, pair.label, pair.device, "max rel err (mixed batch)", rel_err(ours, expected), tol,
                  "rows: other, __base__, default")


def _base_weights(model) -> dict[str, torch.Tensor]:
    """W0 of every LoRA layer (minilora's or PEFT's), by the layer's name without PEFT's prefix."""
    return {name.removeprefix(twins.PEFT_PREFIX): module.base_layer.weight.detach().clone()
            for name, module in model.named_modules()
            if isinstance(module, LoraLinear) or (hasattr(module, "lora_A") and hasattr(module, "base_layer"))}


def _compare_base_weights(mini, theirs) -> tuple[float, str, float]:
    ours, peft_weights = _base_weights(mini), _base_weights(theirs)
    return worst([(name, weight, peft_weights[name]) for name, weight in ours.items()])


def _merge_rows(pair: Pair, mini, theirs, tol: float) -> list[Result]:
    label, device = pair.label, pair.device
    rows = []
    _require_peft("merge_adapter(adapter_names)", "adapter_names" in inspect.signature(theirs.merge_adapter).parameters)
    minilora.merge(mini, adapter_names=["default", "other"])
    theirs.merge_adapter(["default", "other"])
    error, name, _ = _compare_base_weights(mini, theirs)
    rows.append(within(CHECK, label, device, "max rel err (merge_adapter W0)", error, tol, f"worst {name}"))
    minilora.unmerge(mini)
    theirs.unmerge_adapter()
    error, name, _ = _compare_base_weights(mini, theirs)
    rows.append(within(CHECK, label, device, "max rel err (unmerge_adapter W0)", error, tol, f"worst {name}"))
    return rows


def _files_row(pair: Pair, mini, theirs, directory: Path, tol: float) -> Result:
    """Each library saves "default" and "other" in PEFT's layout; the other reads both back."""
    import peft

    label, device = pair.label, pair.device
    minilora.save_adapters(mini, directory / "minilora", selected_adapters=["default", "other"])
    theirs.save_pretrained(str(directory / "peft"), selected_adapters=["default", "other"])
    errors = []
    try:
        for adapter in ("default", "other"):
            minilora.set_adapter(mini, adapter)
            theirs.set_adapter(adapter)
            expected = _output(mini, pair, pair.inputs)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                peft_loaded = peft.PeftModel.from_pretrained(copy.deepcopy(pair.base), str(directory / "minilora"))
                peft_loaded.load_adapter(str(directory / "minilora" / "other"), adapter_name="other")
            peft_loaded.set_adapter(adapter)
            mini_loaded = minilora.load_adapter(copy.deepcopy(pair.base), directory / "peft")
            minilora.load_adapter(mini_loaded, directory / "peft" / "other", adapter_name="other")
            minilora.set_adapter(mini_loaded, adapter)
            errors += [rel_err(_output(peft_loaded.eval(), pair, pair.inputs), expected),
                       rel_err(_output(mini_loaded.eval(), pair, pair.inputs), expected)]
    except Exception as error:  # an old PEFT may not read the layout: say how
        return Result(CHECK, label, device, "several-adapter files", None, None, FAIL,
                      f"{type(error).__name__}: {str(error)[:160]} (PEFT {peft.__version__})")
    return within(CHECK, label, device, "max rel err (several-adapter files both ways)", twins.largest(errors), tol,
                  "default at the root, other/ in a sub-folder")
