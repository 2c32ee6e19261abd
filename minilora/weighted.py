"""A new adapter made from a weighted combination of others: PEFT's ``add_weighted_adapter``.

For adapters i with weights w_i and updates dW_i = s_i B_i A_i, three ways to build one adapter:

- ``"cat"`` (exact): stack them. A = [w_1 s_1 A_1; w_2 s_2 A_2; ...] (rows), B = [B_1 | B_2 | ...]
  (columns), so B A = sum_i w_i s_i B_i A_i = sum_i w_i dW_i. Its rank is the sum of the ranks.
- ``"svd"`` (exact up to truncation): dW = sum_i w_i dW_i, then keep the ``svd_rank`` largest
  singular triplets: B = U_k S_k (out, k), A = V_k^T (k, in). Exact when sum_i r_i <= k.
- ``"linear"`` (an approximation, all ranks equal): A = sum_i sign_i sqrt|w_i s_i| A_i and
  B = sum_i sqrt|w_i s_i| B_i. B A has cross terms B_i A_j, so it is *not* sum_i w_i dW_i
  (PEFT's docs call it "a very rough approximation").

The new adapter's ``lora_alpha`` is its ``r``, so its scaling is 1 (sqrt(r) with use_rslora, as
PEFT: the config is the first adapter's with r, lora_alpha and target_modules replaced). It is built
like any added adapter (drawing A and B from the RNG as PEFT does), then filled, and frozen.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import torch
from torch import nn

from .adapter_checks import few
from .config import MiniLoraError
from .inject import adapter_configs, lora_layers
from .multi import _check_known, add_adapter
from .saved_modules import saved_modules
from .targets import find_targets, resolve_target_modules

COMBINATIONS = ("svd", "linear", "cat")


def add_weighted_adapter(model: nn.Module, adapters: list[str], weights: list[float], adapter_name: str,
                         combination_type: str = "svd", svd_rank: int | None = None, svd_clamp: float | None = None,
                         svd_full_matrices: bool = True, svd_driver: str | None = None) -> None:
    """Add ``adapter_name``, the weighted combination of ``adapters`` (see the module docstring).

    PEFT's arguments and defaults (``combination_type="svd"``; one adapter is always "linear").
    An existing ``adapter_name`` is left as it is, as PEFT does (here with a warning).

    Raises:
        MiniLoraError: before anything changes, for unknown adapters, a combination other than
            svd / linear / cat (PEFT's ties, dare and magnitude_prune are not in minilora), unequal ranks
            with "linear", adapters whose target_modules mix a regex and a list, adapters sharing a
            modules_to_save module, or new targets that select a layer none of the adapters is on.
    """
    if adapter_name in adapter_configs(model):
        warnings.warn(f"add_weighted_adapter: the model has an adapter {adapter_name!r} already; it is left as it "
                      "is (PEFT returns without a word).", stacklevel=2)
        return
    combination_type, new_rank, targets = _check(model, list(adapters), list(weights), combination_type, svd_rank)
    first = adapter_configs(model)[adapters[0]]
    config = dataclasses.replace(first, r=new_rank, lora_alpha=new_rank, target_modules=targets,
                                 rank_pattern={}, alpha_pattern={})
    _check_every_layer_has_one(model, list(adapters), config)
    add_adapter(model, adapter_name, config, autocast_adapter_dtype=False)  # (PEFT: in the base layer's dtype)
    for _, layer in lora_layers(model):
        if adapter_name not in layer.lora_A:
            continue
        target_A, target_B = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        with torch.no_grad():
            target_A.data, target_B.data = target_A.data * 0.0, target_B.data * 0.0
            present = [(name, w) for name, w in zip(adapters, weights) if name in layer.lora_A]
            if combination_type == "cat":
                weight_A = torch.cat([layer.lora_A[name].weight.data * w * layer.scaling[name] for name, w in present])
                weight_B = torch.cat([layer.lora_B[name].weight.data for name, _ in present], dim=1)
                target_A.data[: weight_A.shape[0], :] = weight_A   # (sum r_i, in)
                target_B.data[:, : weight_B.shape[1]] = weight_B   # (out, sum r_i)
            elif combination_type == "svd":
                target_A.data, target_B.data = _svd(layer, present, new_rank, svd_clamp, svd_full_matrices,
                                                    svd_driver)
            else:
                target_A.data, target_B.data = _linear(layer, present)
        target_A.requires_grad_(False)
        target_B.requires_grad_(False)


def _check(model: nn.Module, adapters: list[str], weights: list[float], combination_type: str,
           svd_rank: int | None) -> tuple[str, int, object]:
    """PEFT's ``_check_add_weighted_adapter``: (combination, new rank, new target_modules)."""
    _check_known(model, adapters, "add_weighted_adapter")
    if not adapters or len(weights) != len(adapters):
        raise MiniLoraError(f"add_weighted_adapter needs one weight per adapter, got {len(adapters)} adapters and "
                            f"{len(weights)} weights.")
    if combination_type not in COMBINATIONS:
        raise MiniLoraError(f"combination_type={combination_type!r}: minilora has {list(COMBINATIONS)} (PEFT's ties, "
                            "dare_* and magnitude_prune variants are not in minilora).")
    shared = [name for name, wrapper in saved_modules(model) if sum(a in wrapper.modules_to_save for a in adapters) > 1]
    if shared:
        raise MiniLoraError("Cannot add weighted adapters if they target the same module with modules_to_save, but "
                            f"found {len(shared)} such instance(s). (PEFT's words: {few(shared)} hold a trained copy "
                            "for several of them, and copies cannot be combined.) Combine adapters whose "
                            "modules_to_save differ.")
    configs = [adapter_configs(model)[name] for name in adapters]
    resolved = [resolve_target_modules(model, config) for config in configs]  # None / "all-linear": the names
    combination_type = "linear" if len(adapters) == 1 else combination_type
    ranks = [config.r if not config.rank_pattern else max(config.r, *config.rank_pattern.values())
             for config in configs]
    if combination_type == "linear":
        if len(set(ranks)) != 1:
            raise MiniLoraError("All adapters must have the same r value when using combination_type linear "
                                f"(they have {ranks}); use 'cat' or 'svd'.")
        new_rank = ranks[0]
    elif combination_type == "cat":
        new_rank = sum(ranks)
    else:
        new_rank = svd_rank or max(ranks)
        for name, layer in lora_layers(model):
            if any(adapter in layer.lora_A for adapter in adapters) and new_rank > min(layer.in_features,
                                                                                         layer.out_features):
                raise MiniLoraError(f"svd_rank={new_rank} is more than layer {name!r} has singular values "
                                    f"(min(in, out) = {min(layer.in_features, layer.out_features)}); PEFT would build "
                                    "A and B that do not fit together. Pass a smaller svd_rank.")
    kinds = {isinstance(targets, str) for targets in resolved}
    if len(kinds) > 1:
        raise MiniLoraError("all adapter configs should follow the same target modules type. Combining adapters "
                            "with `target_modules` type being a mix of list/set and string is not supported.")
    if kinds == {True}:
        targets = "|".join(f"({targets})" for targets in resolved)
    else:
        targets = sorted(set().union(*resolved))
    return combination_type, new_rank, targets


def _check_every_layer_has_one(model: nn.Module, adapters: list[str], config) -> None:
    """The new adapter's targets (the union of the adapters', with the first one's other fields, e.g.
    layers_to_transform) may select a layer that none of the adapters is on: PEFT fails there, after
    adding the adapter ("No matching LoRAs found"; an IndexError with "linear")."""
    holding = {name for name, layer in lora_layers(model) if any(adapter in layer.lora_A for adapter in adapters)}
    empty = [name for name in find_targets(model, config) if name not in holding]
    if empty:
        raise MiniLoraError(f"add_weighted_adapter: the new adapter's targets (target_modules={config.target_modules!r}"
                            f", layers_to_transform={config.layers_to_transform!r}) select {few(empty)}, where none "
                            f"of {adapters} has a LoRA layer: no matching LoRAs to combine there (PEFT fails after "
                            "adding the adapter). Combine adapters that target the same layers.")


def _svd(layer, present: list[tuple[str, float]], rank: int, clamp: float | None, full_matrices: bool,
         driver: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) = (V_k^T, U_k S_k) of dW = sum_i w_i dW_i, in PEFT's operations (task_arithmetic, svd)."""
    deltas = [layer.delta_weight(name) for name, _ in present]
    weights = torch.tensor([w for _, w in present]).to(deltas[0].device)
    stacked = torch.stack(deltas, dim=0)                                    # (n, out, in) or (n, in, out)
    delta = (stacked * weights.view(-1, 1, 1)).sum(dim=0)                   # sum_i w_i dW_i
    if layer.fan_in_fan_out:
        delta = delta.T                                                     # Conv1D: back to (out, in)
    U, S, Vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
    U = U[:, :rank] @ torch.diag(S[:rank])                                  # (out, k)
    Vh = Vh[:rank, :]                                                       # (k, in)
    if clamp is not None:
        high = torch.quantile(torch.cat([U.flatten(), Vh.flatten()]), clamp)
        U, Vh = U.clamp(-high, high), Vh.clamp(-high, high)
    return Vh, U


def _linear(layer, present: list[tuple[str, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) = (sum_i sign_i sqrt|w_i s_i| A_i, sum_i sqrt|w_i s_i| B_i), PEFT's operations."""
    weights_A, weights_B = [], []
    for name, w in present:
        scaled = w * layer.scaling[name]
        weights_A.append(math.sqrt(abs(scaled)) * (1 if scaled >= 0 else -1))
        weights_B.append(math.sqrt(abs(scaled)))
    results = []
    for matrices, weights in (([layer.lora_A[n].weight.data for n, _ in present], weights_A),
                              ([layer.lora_B[n].weight.data for n, _ in present], weights_B)):
        stacked = torch.stack(matrices, dim=0)                              # (n, r, in) / (n, out, r)
        weights = torch.tensor(weights).to(stacked.device)
        results.append((stacked * weights.view(-1, 1, 1)).sum(dim=0).to(matrices[0].dtype))
    return results[0], results[1]
