"""lora_bias: lora_B with a trainable bias b, so the update is scaling * (B A x + b); against PEFT 0.21.2.

Every step is made with minilora's native API and with PEFT on the same base and seed: same-seed
weights and RNG use, outputs, gradients, merge / unmerge / merge_and_unload (b0 + s b folded into the
base bias), the files both ways, several adapters and mixed batches. Float32 on the CPU: bitwise.
"""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import minilora
from conftest import record_model
from minilora import LoraConfig, MiniLoraError

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py
PREFIX = "base_model.model."
X = torch.randn(5, 10, generator=torch.Generator().manual_seed(3))


class Net(nn.Module):
    """nn.Linear with a bias, GPT-2's Conv1D (always a bias), and an nn.Linear without one."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 12)
        self.conv = Conv1D(6, 12)  # nf=6 out, nx=12 in: weight (12, 6)
        self.lin1 = nn.Linear(6, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.conv(torch.relu(self.lin0(x)))))


def base() -> Net:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Net()


def fields(**overrides) -> dict:
    return dict(dict(r=4, lora_alpha=8, target_modules=["lin0", "conv"], lora_bias=True, init_lora_weights=False),
                **overrides)


def pair(seed: int = 1, **overrides) -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    """(PEFT model, minilora model, the RNG state each left), same base and seed."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's fan_in_fan_out notice for Conv1D
        theirs = peft.get_peft_model(base(), peft.LoraConfig(**fields(**overrides)))
    after_theirs = torch.get_rng_state()
    torch.manual_seed(seed)
    ours = minilora.inject(base(), LoraConfig(**fields(**overrides)))
    return theirs, ours, after_theirs, torch.get_rng_state()


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key.removeprefix(PREFIX): value for key, value in model.state_dict().items() if ".lora_merged." not in key}


def assert_same_state(theirs: nn.Module, ours: nn.Module) -> None:
    theirs_state, ours_state = state(theirs), state(ours)
    assert sorted(theirs_state) == sorted(ours_state)
    assert [key for key in ours_state if not torch.equal(theirs_state[key], ours_state[key])] == []


def trainable(model: nn.Module) -> list[str]:
    return sorted(name.removeprefix(PREFIX) for name, param in model.named_parameters() if param.requires_grad)


@pytest.mark.parametrize("init", [True, False])
def test_same_seed_same_weights_and_random_numbers_as_peft(init):
    """nn.Linear(r, out, bias=True) draws its bias too: the same numbers, in the same order, as PEFT."""
    theirs, ours, rng_theirs, rng_ours = pair(init_lora_weights=init)
    assert_same_state(theirs, ours)
    assert torch.equal(rng_theirs, rng_ours)
    assert trainable(theirs) == trainable(ours)
    assert "lin0.lora_B.default.bias" in trainable(ours)
    assert ours.lin0.lora_bias == {"default": True}
    bias = ours.lin0.lora_B["default"].bias
    assert bool((bias == 0).all()) == init  # zero at init with init_lora_weights=True, as PEFT


def test_outputs_and_gradients_equal_peft():
    theirs, ours, _, _ = pair()
    with torch.no_grad():
        assert torch.equal(theirs(X), ours(X))
        with minilora.disabled(ours), theirs.disable_adapter():
            assert torch.equal(theirs(X), ours(X))
    for model in (theirs, ours):
        model(X).square().mean().backward()
    grads = {name.removeprefix(PREFIX): p.grad for name, p in theirs.named_parameters() if p.requires_grad}
    assert all(torch.equal(grads[name], p.grad) for name, p in ours.named_parameters() if p.requires_grad)
    assert ours.lin0.lora_B["default"].bias.grad.abs().sum() > 0


def test_update_is_scaling_times_b_a_x_plus_b():
    """The formula: base(x) + s * (B A x + b), written out in float64."""
    layer = minilora.LoraLinear(nn.Linear(7, 5).double(), r=3, lora_alpha=6, init_lora_weights=False, lora_bias=True)
    x = torch.randn(4, 7, dtype=torch.float64)
    A, B, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.lora_B["default"].bias
    with torch.no_grad():
        expected = layer.base_layer(x) + 2.0 * (x @ A.T @ B.T + b)
        assert torch.allclose(layer(x), expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("safe", [False, True])
def test_merge_folds_s_b_into_the_base_bias_as_peft(safe):
    theirs, ours, _, _ = pair()
    theirs.merge_adapter(safe_merge=safe)
    minilora.merge(ours, safe=safe)
    assert_same_state(theirs, ours)
    with torch.no_grad():
        assert torch.equal(theirs(X), ours(X))
    theirs.unmerge_adapter()
    minilora.unmerge(ours)
    assert_same_state(theirs, ours)
    plain, ours_plain = theirs.merge_and_unload(), minilora.merge_and_unload(ours)
    assert plain.state_dict().keys() == ours_plain.state_dict().keys()
    assert all(torch.equal(value, ours_plain.state_dict()[key]) for key, value in plain.state_dict().items())


def test_base_layer_without_a_bias_warns_and_cannot_merge():
    """PEFT warns when the adapter is built and raises when merging; minilora raises before changing anything."""
    words = "`lora_bias=True` was passed but the targeted layer of type Linear has no bias"
    torch.manual_seed(1)
    with pytest.warns(UserWarning, match=words):
        theirs = peft.get_peft_model(base(), peft.LoraConfig(**fields(target_modules=["lin0", "lin1"])))
    torch.manual_seed(1)
    with pytest.warns(UserWarning, match=words):
        ours = minilora.inject(base(), LoraConfig(**fields(target_modules=["lin0", "lin1"])))
    with torch.no_grad():
        assert torch.equal(theirs(X), ours(X))
    with pytest.raises(RuntimeError, match="Impossible to merge LoRA with `lora_bias=True`"):
        theirs.merge_adapter()
    check = record_model(ours)
    for merge in (minilora.merge, minilora.merge_and_unload, lambda m: minilora.merge(m, safe=True)):
        with pytest.raises(MiniLoraError, match="Impossible to merge LoRA with `lora_bias=True` because the base"):
            merge(ours)
        check()  # lin0 (which could merge) was not merged either


def test_files_both_ways(tmp_path):
    theirs, ours, _, _ = pair()
    theirs.save_pretrained(tmp_path / "peft")
    minilora.save_adapter(ours, tmp_path / "mini")
    from safetensors.torch import load_file
    keys = {name: sorted(load_file(tmp_path / name / "adapter_model.safetensors")) for name in ("peft", "mini")}
    assert keys["peft"] == keys["mini"] and f"{PREFIX}lin0.lora_B.bias" in keys["mini"]
    import json
    assert json.loads((tmp_path / "mini" / "adapter_config.json").read_text())["lora_bias"] is True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded_by_peft = peft.PeftModel.from_pretrained(base(), tmp_path / "mini")
    loaded_by_us = minilora.load_adapter(base(), tmp_path / "peft")
    assert_same_state(loaded_by_peft, loaded_by_us)
    assert_same_state(theirs, loaded_by_us)


def test_config_rules_as_peft():
    with pytest.raises(ValueError, match="lora_bias=True is only supported with init_lora_weights=True or False"):
        peft.LoraConfig(target_modules=["lin0"], lora_bias=True, init_lora_weights="gaussian")
    with pytest.raises(MiniLoraError, match="The argument lora_bias=True is only supported with init_lora_weights=True or False"):
        LoraConfig(target_modules=["lin0"], lora_bias=True, init_lora_weights="gaussian")
    with pytest.raises(MiniLoraError, match="lora_bias must be True or False"):
        LoraConfig(target_modules=["lin0"], lora_bias="true")


def test_several_adapters_and_mixed_batches_as_peft():
    """A second adapter without a bias next to one with: tables, outputs per adapter, delete, mixed rows."""
    theirs, ours, _, _ = pair()
    second = dict(r=2, target_modules=["lin0"], init_lora_weights=False)
    torch.manual_seed(5)
    theirs.add_adapter("other", peft.LoraConfig(**second))
    torch.manual_seed(5)
    minilora.add_adapter(ours, "other", LoraConfig(**second))
    assert_same_state(theirs, ours)
    assert ours.lin0.lora_bias == theirs.base_model.model.lin0.lora_bias == {"default": True, "other": False}
    names = ["other", "__base__", "default", "default", "other"]
    theirs.eval(), ours.eval()
    with torch.no_grad():
        expected = theirs(X, adapter_names=names)
        with minilora.mixed_batch(ours, names):
            assert torch.equal(ours(X), expected)
    theirs.delete_adapter("default")
    minilora.delete_adapter(ours, "default")
    assert ours.lin0.lora_bias == theirs.base_model.model.lin0.lora_bias == {"other": False}
    assert_same_state(theirs, ours)


def test_copy_of_the_model_keeps_the_bias():
    _, ours, _, _ = pair()
    twin = copy.deepcopy(ours)
    with torch.no_grad():
        assert torch.equal(twin(X), ours(X))
    assert twin.conv.lora_bias == {"default": True}


def test_parameter_counts_include_b_as_peft():
    theirs, ours, _, _ = pair()
    assert tuple(minilora.count_parameters(ours)) == theirs.get_nb_trainable_parameters()
    rows = {row.name: row for row in minilora.layer_counts(ours)}
    assert rows["lin0"].counted == rows["lin0"].theory == 4 * (10 + 12) + 12


def test_fused_paths_refuse_an_adapter_with_a_bias():
    """The fused paths add s * B A x only: with lora_bias they would silently drop s * b, so they refuse."""
    _, ours, _, _ = pair()
    check = record_model(ours)
    with pytest.raises(MiniLoraError, match="does not add lora_B's bias"):
        minilora.set_forward_path(ours, "fused")
    check()
    plain = minilora.inject(base(), LoraConfig(r=4, target_modules=["lin0"]))
    minilora.set_forward_path(plain, "fused")
    minilora.add_adapter(plain, "biased", LoraConfig(**fields()))
    with torch.no_grad():  # inactive, the biased adapter takes no part: it runs with and without gradients
        expected = minilora.set_forward_path(copy.deepcopy(plain), "reference")(X)
        assert torch.equal(plain(X), expected)
    assert torch.allclose(plain(X), expected, rtol=1e-5, atol=1e-6)
    minilora.set_adapter(plain, "biased")
    for grad in (False, True):  # active, it is refused in both modes (the no-grad call has a faster route)
        with pytest.raises(MiniLoraError, match="does not add lora_B's bias"), torch.set_grad_enabled(grad):
            plain(X)
