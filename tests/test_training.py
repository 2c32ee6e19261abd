"""Training with transformers.Trainer: a minilora model is an ordinary nn.Module to it.

On a tiny in-memory set (token sequences that follow a fixed rule from a random start) the loss falls,
gradients reach only the LoRA parameters, and every base weight stays bit for bit as it was.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

import minilora
from conftest import make_tiny_gpt2
from minilora import LoraConfig

VOCAB, SEQ_LEN, N_SEQUENCES = 64, 16, 8


def token_dataset(seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Random start tokens, then a fixed rule ``next = (5 * token + 3) % VOCAB``: learnable, so the loss can fall."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.empty(N_SEQUENCES, SEQ_LEN, dtype=torch.long)                   # (N, T)
    ids[:, 0] = torch.randint(0, VOCAB, (N_SEQUENCES,), generator=generator)
    for t in range(1, SEQ_LEN):
        ids[:, t] = (5 * ids[:, t - 1] + 3) % VOCAB
    return [{"input_ids": row, "labels": row} for row in ids]


def mean_loss(model, dataset) -> float:
    model.eval()
    with torch.no_grad():
        ids = torch.stack([example["input_ids"] for example in dataset])  # (N, T)
        return model(input_ids=ids, labels=ids).loss.item()


class GradientRecorder(TrainerCallback):
    """Before each optimizer step: which parameters hold a gradient, and is it non-zero."""

    def __init__(self) -> None:
        self.steps: list[dict[str, bool]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.steps.append({name: bool(p.grad.abs().sum() > 0)
                           for name, p in model.named_parameters() if p.grad is not None})


@pytest.mark.parametrize("bias", ["none", "lora_only"])
def test_trainer_lowers_the_loss_and_trains_only_lora(tmp_path, bias):
    # initializer_range 0.2 (GPT-2 uses 0.02): the frozen, tied embedding / output layer is then large
    # enough for the logits to move far; at 0.02 a random toy model's loss cannot fall much below log(64).
    model = make_tiny_gpt2(initializer_range=0.2)
    torch.manual_seed(0)
    minilora.inject(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                      target_modules=["c_attn", "c_proj", "c_fc"], bias=bias))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    frozen_before = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    lora_before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    dataset = token_dataset()
    loss_before = mean_loss(model, dataset)

    recorder = GradientRecorder()
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=25, per_device_train_batch_size=4, learning_rate=1e-2,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, logging_steps=10,
        save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
    )
    Trainer(model=model, args=args, train_dataset=dataset, callbacks=[recorder]).train()
    loss_after = mean_loss(model, dataset)

    assert math.isfinite(loss_after)
    assert loss_after < 0.8 * loss_before, f"loss did not fall: {loss_before:.3f} -> {loss_after:.3f}"

    assert len(recorder.steps) == 25
    for step in recorder.steps:
        assert set(step) == trainable, "gradients must reach exactly the trainable (LoRA) parameters"
    # Step 1 starts from B = 0, so dL/dA = B^T (...) = 0 while dL/dB is not; from then on both move.
    first = recorder.steps[0]
    assert all(first[name] for name in trainable if ".lora_A." not in name)
    assert not any(first[name] for name in trainable if ".lora_A." in name)
    assert all(all(step.values()) for step in recorder.steps[1:]), "every trainable parameter should get a gradient"

    params = dict(model.named_parameters())
    for name, value in frozen_before.items():
        assert torch.equal(params[name], value), f"frozen {name} changed"
    for name, value in lora_before.items():
        assert not torch.equal(params[name], value), f"trainable {name} did not change"
    assert all(".lora_" in name or (bias == "lora_only" and name.endswith("base_layer.bias")) for name in trainable)


def test_trainer_on_gpt2_small_moves_only_lora(gpt2, _gpt2_pristine, tmp_path):
    """The embedded GPT-2 small, a few steps: base weights bitwise unchanged, LoRA moved, loss lower."""
    torch.manual_seed(0)
    minilora.inject(gpt2, LoraConfig(r=8, lora_alpha=32))
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, gpt2.config.vocab_size, (2, 16), generator=generator)  # (N, T)
    dataset = [{"input_ids": row, "labels": row} for row in ids]
    loss_before = mean_loss(gpt2, dataset)
    recorder = GradientRecorder()
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, save_strategy="no",
        report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
    )
    Trainer(model=gpt2, args=args, train_dataset=dataset, callbacks=[recorder]).train()
    loss_after = mean_loss(gpt2, dataset)
    assert loss_after < loss_before, f"loss did not fall: {loss_before:.4f} -> {loss_after:.4f}"

    trainable = {name for name, p in gpt2.named_parameters() if p.requires_grad}
    assert len(trainable) == 2 * 12 and all(".lora_" in name for name in trainable)
    assert all(set(step) == trainable for step in recorder.steps)
    pristine = _gpt2_pristine.state_dict()
    for name, value in gpt2.state_dict().items():
        if ".lora_" not in name:
            assert torch.equal(value, pristine[name.replace(".base_layer.", ".")]), f"base weight {name} changed"
    assert all(torch.count_nonzero(layer.lora_B["default"].weight) > 0 for _, layer in minilora.lora_layers(gpt2))
