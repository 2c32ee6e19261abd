"""The analytical floor: what the LoRA branches add, in multiply-adds and bytes, over the base model.

No implementation of LoRA can cost less than the arithmetic and the memory traffic the update
itself needs, so these fractions are the floor under a measured ratio. Counted from the shapes
of one forward over N = batch x new tokens that attend to ``context`` positions:

Multiply-adds (MACs)
    base:  N * sum(in * out) over every linear layer (the LM head too)
           + n_layer * 2 * N * context * d                 (attention: q k^T and the weighted sum)
    LoRA:  N * r * (in + out) per adapted layer            (x A^T, then (x A^T) B^T)

Elements moved (each tensor read or written once, the least any kernel must move; the same
element size on both sides, so the fraction is also that of the bytes)
    base:  sum(in * out + N * in + N * out) over the linear layers   (weight, input, output)
           + n_layer * 2 * batch * context * d                       (K and V read by attention)
    LoRA:  r * (in + out) + 2 * N * r per adapted layer               (A and B, the (N, r) x A^T
           written and read back; adding into the base output can ride on the base matmul)

A training step (forward + backward with frozen base weights): the base's backward computes
input gradients only (one more N * in * out per layer) and attention's backward twice its forward;
LoRA's backward is two more N * r * (in + out) (the gradients of x A^T and B, then of A and x).
Bytes: forward and backward each move the forward's bytes, and LoRA writes its gradients.

Merged weights (and the base model) have a floor of 0: they do the base model's arithmetic.
"""

from __future__ import annotations

from torch import nn


def linear_layers(model: nn.Module) -> list[tuple[str, int, int]]:
    """(name, in_features, out_features) of every nn.Linear and Conv1D, LoRA's own A and B left out
    (in a model with LoRA layers, a wrapped layer is named as before: ``...c_attn``, not ``.base_layer``)."""
    from transformers.pytorch_utils import Conv1D

    layers = []
    for name, module in model.named_modules():
        if ".lora_" in f".{name}":
            continue
        name = name.removesuffix(".base_layer")
        if isinstance(module, Conv1D):
            fan_in, fan_out = module.weight.shape  # Conv1D stores (in, out)
            layers.append((name, fan_in, fan_out))
        elif isinstance(module, nn.Linear):
            layers.append((name, module.in_features, module.out_features))
    return layers


def lora_floor(model: nn.Module, targets: tuple, r: int, forwards: list[tuple[int, int, int]],
               training: bool = False, adapters: int = 1) -> dict[str, float]:
    """{"macs": LoRA MACs / base MACs, "bytes": LoRA bytes / base bytes} over a list of forwards.

    Args:
        model: the bare base model (its layer shapes and config.n_layer, config.n_embd are read).
        targets: names of the adapted layers (the last component of a module name, as in
            ``target_modules``).
        r: the rank.
        forwards: (batch, new_tokens, context) per forward call of the workload, e.g. one
            (4, 128, 128) for prefill, or (1, 8, 8) then (1, 1, 9), (1, 1, 10), ... for decode.
        training: count forward and backward (see the module docstring).
        adapters: how many adapters' A and B one call reads (a mixed batch: each row runs one
            adapter, so the multiply-adds stay those of one, but every adapter's weights are read).
    """
    layers = linear_layers(model)
    adapted = [(fan_in, fan_out) for name, fan_in, fan_out in layers if name.split(".")[-1] in targets]
    n_layer, d = model.config.n_layer, model.config.n_embd
    base_macs = lora_macs = base_bytes = lora_bytes = 0
    for batch, new, context in forwards:
        n = batch * new
        matmul_macs = n * sum(fan_in * fan_out for _, fan_in, fan_out in layers)
        attention_macs = n_layer * 2 * n * context * d
        adapter_macs = n * sum(r * (fan_in + fan_out) for fan_in, fan_out in adapted)
        base_macs += (2 * matmul_macs + 3 * attention_macs) if training else (matmul_macs + attention_macs)
        lora_macs += 3 * adapter_macs if training else adapter_macs
        forward_base_bytes = sum(fan_in * fan_out + n * fan_in + n * fan_out for _, fan_in, fan_out in layers) \
            + n_layer * 2 * batch * context * d
        forward_lora_bytes = sum(adapters * r * (fan_in + fan_out) + 2 * n * r for fan_in, fan_out in adapted)
        gradients = sum(r * (fan_in + fan_out) for fan_in, fan_out in adapted)
        base_bytes += 2 * forward_base_bytes if training else forward_base_bytes
        lora_bytes += (2 * forward_lora_bytes + gradients) if training else forward_lora_bytes
    return {"macs": lora_macs / base_macs, "bytes": lora_bytes / base_bytes}
