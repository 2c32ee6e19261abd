"""The numerical checks: minilora against PEFT on one twin pair, each a function returning rows.

Every check takes a ``Pair`` (a minilora model and a PEFT model with the same adapter, see
``parity.grid``) and returns ``Result`` rows. The order in which the suite calls them matters,
because some change the models: ``counts`` and ``init`` need the fresh same-seed pair; ``forward``
and ``backward`` need equal non-zero adapters (``grid.randomize``); ``training`` trains both sides;
``merge`` ends with ``merge_and_unload`` and leaves the pair unusable.

Tolerances. On the CPU minilora runs PEFT's operations in PEFT's order, so equal inputs give
bitwise-equal outputs: the CPU tolerance is 0 (bitwise) for outputs, gradients and trained weights.
Other devices may pick different kernels for the same op, so there the tolerance is a relative
error (max |a - b| / max |b|) sized to the dtype's precision.
"""

from __future__ import annotations

import torch
from torch import nn

import minilora
from minilora.inject import is_lora_parameter
from parity import twins
from parity.grid import Pair, loss, make_inputs, output
from parity.results import PASS, FAIL, Result, not_applicable, within

# Relative tolerances off the CPU, per dtype: a few hundred ulps of the dtype's precision.
RELATIVE_TOLERANCE = {"float64": 1e-10, "float32": 1e-5, "bfloat16": 2e-2}


def tolerance(pair: Pair) -> float:
    """0.0 (bitwise) on the CPU, where the op order is PEFT's; else the dtype's relative tolerance."""
    return 0.0 if pair.device == "cpu" else RELATIVE_TOLERANCE[pair.case.dtype]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| in float64 (0.0 exactly when bitwise equal)."""
    if torch.equal(a, b):  # the common case, and cheap: no float64 copies of big tensors
        return 0.0
    return twins.max_rel_diff(a, b)


def worst(named: list[tuple[str, torch.Tensor, torch.Tensor]]) -> tuple[float, str, float]:
    """(largest relative error, the tensor it is in, that tensor's max abs error)."""
    errors = [(0.0, name, 0.0) if torch.equal(a, b) else (rel_err(a, b), name, twins.max_abs_diff(a, b))
              for name, a, b in named]
    nan = [error for error in errors if error[0] != error[0]]  # (max() never picks a NaN after a number)
    return nan[0] if nan else max(errors) if errors else (0.0, "-", 0.0)


def lora_pairs(pair: Pair, attribute: str = "data") -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(minilora key, minilora tensor, PEFT tensor) for every LoRA weight; ``attribute="grad"`` for grads.

    Raises:
        KeyError: naming a minilora LoRA key that the PEFT model does not have.
    """
    peft_params = dict(pair.peft.named_parameters())
    rows = []
    for name, param in pair.mini.named_parameters():
        if is_lora_parameter(name):
            rows.append((name, getattr(param, attribute), getattr(peft_params[twins.peft_key(name)], attribute)))
    return rows


# ------------------------------------------------------------------------------------------------
# counts
# ------------------------------------------------------------------------------------------------
def peft_counts(peft_model: nn.Module) -> tuple[int, int]:
    """(trainable, total) from PEFT's own ``get_nb_trainable_parameters`` (counted by hand before 0.7)."""
    if hasattr(peft_model, "get_nb_trainable_parameters"):
        return tuple(peft_model.get_nb_trainable_parameters())
    params = list(peft_model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def check_counts(pair: Pair) -> list[Result]:
    """Trainable / total as PEFT counts them, and the per-layer r * (in + out) formula."""
    label, device = pair.label, pair.device
    mini = tuple(minilora.count_parameters(pair.mini))
    peft_numbers = peft_counts(pair.peft)
    same = mini == peft_numbers
    rows = [Result(
        "counts", label, device, "trainable / total", f"{mini[0]:,} / {mini[1]:,}", None,
        PASS if same else FAIL,
        "equal to PEFT's get_nb_trainable_parameters" if same
        else f"minilora {mini[0]:,} / {mini[1]:,} but PEFT {peft_numbers[0]:,} / {peft_numbers[1]:,}",
    )]
    layers = minilora.layer_counts(pair.mini)
    formula = sum(layer.r * (layer.in_features + layer.out_features) for layer in layers)
    lora_counted = sum(p.numel() for n, p in pair.mini.named_parameters() if ".lora_" in n and p.requires_grad)
    peft_lora = sum(p.numel() for n, p in pair.peft.named_parameters() if ".lora_" in n and p.requires_grad)
    bad = [layer.name for layer in layers if layer.counted != layer.theory]
    ok = not bad and formula == lora_counted == peft_lora
    rows.append(Result(
        "counts", label, device, "sum r*(in+out)", f"{formula:,}", None, PASS if ok else FAIL,
        f"{len(layers)} layers; equals the trainable LoRA numbers of minilora and PEFT" if ok else
        f"formula {formula:,}, minilora LoRA params {lora_counted:,}, PEFT LoRA params {peft_lora:,}"
        + (f"; layers off the formula: {bad[:3]}" if bad else ""),
    ))
    return rows


# ------------------------------------------------------------------------------------------------
# init
# ------------------------------------------------------------------------------------------------
def check_init(pair: Pair) -> list[Result]:
    """Same seed, same adapter: A and B right after inject / get_peft_model, bitwise."""
    named = lora_pairs(pair)
    error, name, abs_error = worst(named)
    b_zero = all(bool((b == 0).all()) for n, b, _ in named if ".lora_B." in n)
    return [within("init", pair.label, pair.device, "max rel err (A, B)", error, 0.0,
                   f"{len(named)} tensors" + ("" if error == 0 else f"; worst {name} (abs {abs_error:.2e})")
                   + ("" if b_zero else "; B is not zero at init"))]


# ------------------------------------------------------------------------------------------------
# forward
# ------------------------------------------------------------------------------------------------
def check_forward(pair: Pair, seed: int = 1234) -> list[Result]:
    """Outputs in eval mode, and in train mode (dropout) with the same RNG state on both sides."""
    label, device, tol = pair.label, pair.device, tolerance(pair)
    with torch.no_grad():
        pair.mini.eval()
        pair.peft.eval()
        mini_out, peft_out = output(pair.mini, pair), output(pair.peft, pair)
        with minilora.disabled(pair.mini):
            base_out = output(pair.mini, pair)
        visible = twins.max_abs_diff(mini_out, base_out)

        pair.mini.train()
        pair.peft.train()
        torch.manual_seed(seed)  # seeds every device's generator
        mini_train = output(pair.mini, pair)
        torch.manual_seed(seed)
        peft_train = output(pair.peft, pair)
        pair.mini.eval()
        pair.peft.eval()
    rows = [
        within("forward", label, device, "max rel err (eval)", rel_err(mini_out, peft_out), tol,
               f"abs {twins.max_abs_diff(mini_out, peft_out):.2e}; the adapter moves outputs by {visible:.2e}"),
        within("forward", label, device, "max rel err (train, same RNG)", rel_err(mini_train, peft_train), tol,
               f"abs {twins.max_abs_diff(mini_train, peft_train):.2e}"),
    ]
    if not visible > 0:
        rows.append(Result("forward", label, device, "max |adapted - base|", visible, None, FAIL,
                           "the adapter does not change the output: the comparison proves nothing "
                           "(call grid.randomize(pair) for non-zero B)"))
    return rows


# ------------------------------------------------------------------------------------------------
# backward
# ------------------------------------------------------------------------------------------------
def check_backward(pair: Pair) -> list[Result]:
    """Gradients of every LoRA parameter after one backward pass of the same loss."""
    for model in (pair.mini, pair.peft):
        model.eval()
        model.zero_grad(set_to_none=True)
        loss(model, pair).backward()
    named = lora_pairs(pair, "grad")
    missing = [name for name, a, b in named if a is None or b is None]
    frozen_with_grad = [n for n, p in pair.mini.named_parameters() if not p.requires_grad and p.grad is not None]
    if missing or frozen_with_grad:
        return [Result("backward", pair.label, pair.device, "LoRA grads", None, None, FAIL,
                       f"no grad for {missing[:3]}; frozen params with grad: {frozen_with_grad[:3]}")]
    error, name, abs_error = worst(named)
    for model in (pair.mini, pair.peft):
        model.zero_grad(set_to_none=True)
    return [within("backward", pair.label, pair.device, "max rel err (LoRA grads)", error, tolerance(pair),
                   f"{len(named)} tensors; worst {name} (abs {abs_error:.2e})")]


# ------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------
def train(model: nn.Module, pair: Pair, steps: int, lr: float) -> list[float]:
    """``steps`` AdamW steps on batches 0..steps-1, dropout seeded per step; returns the losses."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, foreach=False)
    model.train()
    losses = []
    for step in range(steps):
        pair_inputs = make_inputs(pair.case, model, pair.device, seed=100 + step)
        batch = Pair(pair.case, pair.device, pair.mini, pair.peft, *pair_inputs)
        torch.manual_seed(step)
        value = loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()
        losses.append(value.item())
    model.eval()
    model.zero_grad(set_to_none=True)
    return losses


def check_training(pair: Pair, steps: int = 3, lr: float = 1e-3) -> list[Result]:
    """The adapter weights after ``steps`` AdamW steps on the same batches (dropout under the same RNG)."""
    mini_losses = train(pair.mini, pair, steps, lr)
    peft_losses = train(pair.peft, pair, steps, lr)
    error, name, abs_error = worst(lora_pairs(pair))
    return [within("training", pair.label, pair.device, f"max rel err (A, B after {steps} steps)", error,
                   tolerance(pair),
                   f"loss {mini_losses[0]:.4g} -> {mini_losses[-1]:.4g} (PEFT {peft_losses[-1]:.4g}); "
                   f"worst {name} (abs {abs_error:.2e})")]


# ------------------------------------------------------------------------------------------------
# merge
# ------------------------------------------------------------------------------------------------
def _base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: layer.base_layer.weight.detach().clone() for name, layer in minilora.lora_layers(model)}


def _peft_base_weights(peft_model: nn.Module) -> dict[str, torch.Tensor]:
    """W0 of every PEFT LoRA layer. Before PEFT 0.7 the LoRA layer *was* the nn.Linear (no base_layer)."""
    return {name: getattr(module, "base_layer", module).weight.detach().clone()
            for name, module in peft_model.named_modules() if hasattr(module, "lora_A")}


def _restore(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    modules = dict(model.named_modules())
    for name, weight in weights.items():
        getattr(modules[name], "base_layer", modules[name]).weight.data.copy_(weight)


def check_merge(pair: Pair) -> list[Result]:
    """Merged outputs and weights against PEFT's; the unmerge residual; merge_and_unload's layer types.

    Leaves both models merged and unloaded (plain layers): call it last on a pair.
    """
    label, device, tol = pair.label, pair.device, tolerance(pair)
    rows = []
    adapted_layers = {name for name, _ in minilora.lora_layers(pair.mini)}
    with torch.no_grad():
        # merge -> outputs -> unmerge, on both sides; the residual is what unmerge fails to restore
        before_mini, before_peft = _base_weights(pair.mini), _peft_base_weights(pair.peft)
        adapted = output(pair.mini, pair)
        minilora.merge(pair.mini)
        pair.peft.merge_adapter()
        mini_merged, peft_merged = output(pair.mini, pair), output(pair.peft, pair)
        minilora.unmerge(pair.mini)
        pair.peft.unmerge_adapter()
        after_mini, after_peft = _base_weights(pair.mini), _peft_base_weights(pair.peft)
        residual = twins.largest(twins.max_abs_diff(after_mini[k], before_mini[k]) for k in before_mini)
        peft_residual = twins.largest(twins.max_abs_diff(after_peft[k], before_peft[k]) for k in before_peft)
        scale = max(w.double().abs().max().item() for w in before_mini.values())
        eps = torch.finfo(next(iter(before_mini.values())).dtype).eps
        residual_tol = max(2 * peft_residual, 4 * eps * scale)
        rows.append(within("merge", label, device, "max rel err (merged outputs)",
                           rel_err(mini_merged, peft_merged), tol,
                           f"merged vs unmerged minilora: rel {rel_err(mini_merged, adapted):.2e}"))
        rows.append(within("merge", label, device, "unmerge residual max|W - W0|", residual, residual_tol,
                           f"PEFT leaves {peft_residual:.2e}"))

        # merge_and_unload, from the original W0 on both sides (so that a difference in unmerge's
        # rounding, reported above, does not show up again here): plain layers holding W0 + dW
        _restore(pair.mini, before_mini)
        _restore(pair.peft, before_peft)
        mini_plain = minilora.merge_and_unload(pair.mini)
        peft_plain = pair.peft.merge_and_unload()
        mini_state, peft_state = mini_plain.state_dict(), peft_plain.state_dict()
        if mini_state.keys() != peft_state.keys():
            extra = sorted(set(mini_state) ^ set(peft_state))
            rows.append(Result("merge", label, device, "merge_and_unload keys", None, None, FAIL,
                               f"state dict keys differ: {extra[:4]}"))
        else:
            error, name, abs_error = worst([(k, mini_state[k], peft_state[k]) for k in mini_state])
            rows.append(within("merge", label, device, "max rel err (merge_and_unload weights)", error, tol,
                               f"{len(mini_state)} tensors; worst {name} (abs {abs_error:.2e})"))
        mini_types = {n: type(m).__name__ for n, m in mini_plain.named_modules() if n in adapted_layers}
        peft_types = {n: type(m).__name__ for n, m in peft_plain.named_modules() if n in adapted_layers}
        same_types = mini_types == peft_types
        rows.append(Result("merge", label, device, "layer types after unload", ",".join(sorted(set(mini_types.values()))),
                           None, PASS if same_types else FAIL,
                           "same module types as PEFT's merge_and_unload" if same_types
                           else f"minilora {sorted(set(mini_types.values()))} vs PEFT {sorted(set(peft_types.values()))}"))
        rows.append(within("merge", label, device, "max rel err (unloaded model outputs)",
                           rel_err(output(mini_plain, pair), output(peft_plain, pair)), tol))
    return rows



# ------------------------------------------------------------------------------------------------
# targets
# ------------------------------------------------------------------------------------------------
def check_targets(pair: Pair) -> list[Result]:
    """The layers minilora wrapped are the layers PEFT wrapped, in the same order."""
    mini = [name for name, _ in minilora.lora_layers(pair.mini)]
    # the modules holding lora_A (PEFT's targeted_module_names is newer than some releases the matrix runs)
    peft_names = [name for name, module in pair.peft.base_model.model.named_modules() if hasattr(module, "lora_A")]
    same = mini == peft_names
    missing, extra = sorted(set(peft_names) - set(mini)), sorted(set(mini) - set(peft_names))
    return [Result("targets", pair.label, pair.device, "layers wrapped", len(mini), None, PASS if same else FAIL,
                   f"the same {len(mini)} layers as PEFT ({', '.join(sorted({n.rsplit('.', 1)[-1] for n in mini}))})"
                   if same else f"PEFT wraps {missing[:3]} that minilora does not; minilora wraps {extra[:3]} that "
                   "PEFT does not" + ("" if missing or extra else "; the same layers in another order"))]


def check_refusal(base: nn.Module, case, device: str, error: Exception) -> list[Result]:
    """The twins could not be built: PASS when PEFT refuses the case too, N/A when minilora refuses what
    PEFT does with LoRA on bare parameters (target_parameters, e.g. fused MoE experts), else FAIL."""
    import copy
    import warnings

    import peft

    mine = f"{type(error).__name__}: {str(error).splitlines()[0][:110]}"
    if not isinstance(error, minilora.MiniLoraError):
        return [Result("targets", case.label, device, "refusal", None, None, FAIL,
                       f"building the twins raised {mine} (not a MiniLoraError from minilora)")]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            twin = peft.get_peft_model(copy.deepcopy(base), twins.peft_config(case.config()))
    except Exception as peft_error:  # noqa: BLE001 - any refusal of PEFT's
        return [Result("targets", case.label, device, "refusal", "both refuse", None, PASS,
                       f"PEFT: {type(peft_error).__name__}: {str(peft_error).splitlines()[0][:70]}; "
                       f"minilora: {mine[:90]}")]
    parameters = getattr(twin.peft_config["default"], "target_parameters", None)
    if parameters:
        return [not_applicable("targets", case.label, device, f"minilora refuses (PEFT puts LoRA on parameters "
                                                              f"{sorted(parameters)[:3]}): {mine[:80]}")]
    return [Result("targets", case.label, device, "refusal", "minilora only", None, FAIL,
                   f"minilora refuses ({mine}) but PEFT wraps {len(twin.base_model.targeted_module_names)} layers")]


# ------------------------------------------------------------------------------------------------
# generate
# ------------------------------------------------------------------------------------------------
GENERATED_TOKENS = 4


def _generate(model: nn.Module, pair: Pair):
    if isinstance(pair.inputs, dict):
        inputs = {k: v for k, v in pair.inputs.items() if k != "decoder_input_ids"}  # the decoder starts itself
    else:
        inputs = {"input_ids": pair.inputs}
    return model.generate(**inputs, max_new_tokens=GENERATED_TOKENS, min_new_tokens=GENERATED_TOKENS,
                          do_sample=False, num_beams=1, output_scores=True, return_dict_in_generate=True,
                          pad_token_id=0)


def check_generate(pair: Pair) -> list[Result]:
    """Greedy ``generate()``: the same tokens, and the same scores at every step."""
    arch = pair.case.architecture
    if (arch is None and pair.case.model == "linear") or (arch is not None and not arch.generates):
        return [not_applicable("generate", pair.label, pair.device, "this model has no generate()")]
    with torch.no_grad():
        pair.mini.eval()
        pair.peft.eval()
        mini, peft_out = _generate(pair.mini, pair), _generate(pair.peft, pair)
    same_tokens = torch.equal(mini.sequences, peft_out.sequences)
    error, step, _ = worst([(f"step {i}", a, b) for i, (a, b) in enumerate(zip(mini.scores, peft_out.scores))])
    rows = [within("generate", pair.label, pair.device, f"max rel err (scores of {GENERATED_TOKENS} greedy steps)",
                   error, tolerance(pair), f"worst at {step}")]
    rows.append(Result("generate", pair.label, pair.device, "tokens", "same" if same_tokens else "differ", None,
                       PASS if same_tokens else FAIL,
                       f"{GENERATED_TOKENS} greedy tokens equal to PEFT's" if same_tokens
                       else f"minilora {mini.sequences[0].tolist()} vs PEFT {peft_out.sequences[0].tolist()}"))
    return rows
