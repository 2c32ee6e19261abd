"""PEFT as the oracle: minilora and peft.get_peft_model, side by side on the same base model.

minilora's LoraLinear runs PEFT's lora.Linear operations in PEFT's order and draws its init in
PEFT's order, so on the installed PEFT the two agree bit for bit: same-seed adapter weights,
eval logits, train-mode outputs with dropout under the same RNG state, and LoRA gradients. Those
checks are exact (tolerance 0): any difference means the two implementations diverged. Merged
weights are held to the issue's 1e-6.

Models: GPT-2 small (the embedded default), a toy-size GPT-2 (the same Conv1D layout, cheap enough
to run every variant), a small nn.Linear MLP, and the one-layer nn.Linear(10, 1) model with
target_modules=["linear"].
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from transformers.pytorch_utils import Conv1D

import minilora
from conftest import DEVICES, make_tiny_gpt2
from minilora import LoraConfig
from parity.twins import (
    adapter_state,
    copy_adapters_to_peft,
    make_twins,
    max_abs_diff,
    peft_config,
    peft_key,
    randomize_adapters,
)

MERGE_TOLERANCE = 1e-6  # issue 2: merge_and_unload weights equal PEFT's within 1e-6
HALF_DTYPES = [torch.bfloat16, torch.float16]


class OneLinear(nn.Module):
    """The smallest model LoRA fits: y = linear(x), nn.Linear(10, 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(10, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def make_mlp() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 4)).eval()


def make_one_linear() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        return OneLinear().eval()


# name -> (build the base model, target_modules, draw an input batch)
SMALL_MODELS = {
    "tiny_gpt2": (make_tiny_gpt2, ["c_attn", "c_proj", "c_fc"],
                  lambda g: torch.randint(0, 64, (2, 12), generator=g)),             # (B, T) token ids
    "mlp": (make_mlp, ["0", "2", "4"], lambda g: torch.randn(5, 16, generator=g)),     # (B, in)
    "one_linear": (make_one_linear, ["linear"], lambda g: torch.randn(5, 10, generator=g)),
}
model_params = pytest.mark.parametrize("model_name", SMALL_MODELS)


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out.logits if hasattr(out, "logits") else out


def batch(model_name: str, device="cpu", dtype=torch.float32) -> torch.Tensor:
    x = SMALL_MODELS[model_name][2](torch.Generator().manual_seed(5))
    return (x.to(dtype) if x.is_floating_point() else x).to(device)


def same_seed_pair(base: nn.Module, config: LoraConfig, seed: int = 0):
    """Inject with minilora and with PEFT from the same seed; also return the RNG state each left."""
    mini, twin = copy.deepcopy(base), copy.deepcopy(base)
    torch.manual_seed(seed)
    minilora.inject(mini, config)
    after_mini = torch.get_rng_state()
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's fan_in_fan_out notice for Conv1D
        import peft
        twin = peft.get_peft_model(twin, peft_config(config))
    return mini, twin, after_mini, torch.get_rng_state()


def assert_same_adapters(mini: nn.Module, twin: nn.Module, expected_dtype: torch.dtype) -> None:
    """Every LoRA tensor bitwise equal to PEFT's, same dtype and device, and none left over on either side."""
    ours = adapter_state(mini)
    theirs = {k: v for k, v in twin.state_dict().items() if ".lora_A." in k or ".lora_B." in k}
    assert sorted(peft_key(k) for k in ours) == sorted(theirs)
    for key, value in ours.items():
        other = theirs[peft_key(key)]
        assert value.dtype == other.dtype == expected_dtype, key
        assert value.device == other.device, key
        assert torch.equal(value, other), f"{key}: max |diff| = {max_abs_diff(value, other):.3e}"


def lora_gradients(model: nn.Module, key=lambda name: name) -> dict[str, torch.Tensor]:
    return {key(name): p.grad for name, p in model.named_parameters() if ".lora_A." in name or ".lora_B." in name}


# ------------------------------------------------------------------------------------------------
# GPT-2 small: the embedded default, as a user would run it
# ------------------------------------------------------------------------------------------------
@pytest.mark.usefixtures("one_thread")  # bitwise logits of two GPT-2 smalls: multithreaded MKL's sums may differ run to run
def test_gpt2_small_against_peft(_gpt2_pristine):
    """One pair of GPT-2 smalls (copying 124M parameters is the cost here), three stages:
    same-seed adapters, then equal random adapters give equal logits, then merge_and_unload."""
    config = LoraConfig(r=8, lora_alpha=32, target_modules=["c_attn", "c_proj", "c_fc"])
    mini, twin, rng_mini, rng_peft = same_seed_pair(_gpt2_pristine, config)
    assert_same_adapters(mini, twin, torch.float32)
    assert torch.equal(rng_mini, rng_peft), "minilora and PEFT drew a different amount of random numbers"
    assert len(adapter_state(mini)) == 2 * 3 * 12 + 2 * 12  # c_proj is in attn and in mlp

    randomize_adapters(mini)  # non-zero B, so the update shows in the logits
    copy_adapters_to_peft(mini, twin)
    assert_same_adapters(mini, twin, torch.float32)
    tokens = torch.randint(0, 50257, (2, 8), generator=torch.Generator().manual_seed(0))  # (B, T)
    with torch.no_grad():
        ours, theirs = mini(tokens).logits, twin(tokens).logits
    assert torch.equal(ours, theirs), f"eval logits differ by {max_abs_diff(ours, theirs):.3e}"

    minilora.merge_and_unload(mini)
    plain = twin.merge_and_unload()
    assert [(n, type(m)) for n, m in mini.named_modules()] == [(n, type(m)) for n, m in plain.named_modules()]
    assert isinstance(mini.transformer.h[0].mlp.c_fc, Conv1D)
    ours, theirs = mini.state_dict(), plain.state_dict()
    assert ours.keys() == theirs.keys()
    before = _gpt2_pristine.state_dict()
    changed = [k for k in ours if not torch.equal(ours[k], before[k])]
    assert len(changed) == 4 * 12, "merge_and_unload should change exactly the adapted weights"
    for key in changed:
        diff = max_abs_diff(ours[key], theirs[key])
        assert diff <= MERGE_TOLERANCE, f"{key}: merged weights differ from PEFT's by {diff:.3e}"
    unchanged = [k for k in ours if k not in changed]
    assert all(torch.equal(ours[k], theirs[k]) for k in unchanged)


# ------------------------------------------------------------------------------------------------
# Same seed, same adapter: every init, every dtype
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("init", [True, "gaussian", False])
@model_params
def test_same_seed_gives_peft_adapters(model_name, init, device):
    make, targets, _ = SMALL_MODELS[model_name]
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=init)
    mini, twin, rng_mini, rng_peft = same_seed_pair(make().to(device), config, seed=3)
    assert_same_adapters(mini, twin, torch.float32)
    assert torch.equal(rng_mini, rng_peft), "minilora and PEFT drew a different amount of random numbers"
    for _, layer in minilora.lora_layers(mini):
        assert layer.lora_A["default"].weight.device == layer.base_layer.weight.device
        assert (torch.count_nonzero(layer.lora_B["default"].weight) == 0) == (init is not False)


@pytest.mark.parametrize("dtype", [torch.float64, *HALF_DTYPES], ids=lambda d: str(d).removeprefix("torch."))
@model_params
def test_adapter_dtype_and_values_follow_peft_on_other_bases(model_name, dtype):
    """PEFT's default (autocast_adapter_dtype=True): float32 adapters on bfloat16 / float16 bases,
    the base's dtype otherwise; the init is rounded through the base dtype first, as PEFT does."""
    make, targets, _ = SMALL_MODELS[model_name]
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets)
    mini, twin, _, _ = same_seed_pair(make().to(dtype), config, seed=4)
    assert_same_adapters(mini, twin, torch.float32 if dtype in HALF_DTYPES else dtype)
    for _, layer in minilora.lora_layers(mini):
        assert layer.base_layer.weight.dtype == dtype


# ------------------------------------------------------------------------------------------------
# Equal adapters, equal numbers: outputs, dropout, gradients, merged weights
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, *HALF_DTYPES], ids=lambda d: str(d).removeprefix("torch."))
@model_params
def test_eval_outputs_bitwise_equal_peft(model_name, dtype):
    make, targets, _ = SMALL_MODELS[model_name]
    mini, twin = make_twins(make().to(dtype), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    x = batch(model_name, dtype=dtype)
    with torch.no_grad():
        ours, theirs = outputs(mini, x), outputs(twin, x)
        with minilora.disabled(mini), twin.disable_adapter():
            ours_off, theirs_off = outputs(mini, x), outputs(twin, x)
    assert ours.dtype == theirs.dtype == dtype
    assert torch.equal(ours, theirs), f"outputs differ by {max_abs_diff(ours, theirs):.3e}"
    assert torch.equal(ours_off, theirs_off), "disabled outputs differ from PEFT's disable_adapter()"
    assert not torch.equal(ours, ours_off), "the adapters should change the outputs"


@model_params
def test_train_mode_with_dropout_equals_peft_under_the_same_rng_state(model_name):
    """Dropout draws masks from the global RNG; both sides draw the same masks in the same order."""
    make, targets, _ = SMALL_MODELS[model_name]
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, target_modules=targets)
    mini, twin = make_twins(make(), config)
    mini.train(), twin.train()
    x = batch(model_name)
    torch.manual_seed(7)
    ours = outputs(mini, x)
    torch.manual_seed(7)
    theirs = outputs(twin, x)
    with torch.no_grad():
        mini.eval()
        assert not torch.equal(ours, outputs(mini, x)), "dropout should change the train-mode output"
    assert torch.equal(ours, theirs), f"train-mode outputs differ by {max_abs_diff(ours, theirs):.3e}"


@pytest.mark.parametrize("dropout", [0.0, 0.2])
@model_params
def test_lora_gradients_equal_peft(model_name, dropout):
    make, targets, _ = SMALL_MODELS[model_name]
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=targets)
    mini, twin = make_twins(make(), config)
    mini.train(), twin.train()
    x = batch(model_name)
    for model in (mini, twin):
        torch.manual_seed(11)
        outputs(model, x).float().square().mean().backward()
    ours = lora_gradients(mini, key=peft_key)
    theirs = lora_gradients(twin)
    assert ours.keys() == theirs.keys()
    for name, grad in ours.items():
        assert grad is not None and grad.abs().sum() > 0, f"{name}: no gradient"
        assert torch.equal(grad, theirs[name]), f"{name}: gradients differ by {max_abs_diff(grad, theirs[name]):.3e}"
    frozen_with_grad = [n for n, p in mini.named_parameters() if not p.requires_grad and p.grad is not None]
    assert not frozen_with_grad


@pytest.mark.parametrize("dtype", [torch.float32, *HALF_DTYPES], ids=lambda d: str(d).removeprefix("torch."))
@model_params
def test_merge_and_unload_weights_equal_peft(model_name, dtype):
    make, targets, _ = SMALL_MODELS[model_name]
    mini, twin = make_twins(make().to(dtype), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    plain_types = [(n, type(m)) for n, m in make().named_modules()]
    minilora.merge_and_unload(mini)
    plain = twin.merge_and_unload()
    assert [(n, type(m)) for n, m in mini.named_modules()] == plain_types
    ours, theirs = mini.state_dict(), plain.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key].dtype == theirs[key].dtype == dtype
        diff = max_abs_diff(ours[key], theirs[key])
        assert diff <= MERGE_TOLERANCE, f"{key}: merged weights differ from PEFT's by {diff:.3e}"


@pytest.mark.parametrize("dtype", [torch.float32, *HALF_DTYPES], ids=lambda d: str(d).removeprefix("torch."))
def test_safe_merge_equals_peft_safe_merge(dtype):
    """merge(safe=True) writes exactly the weight PEFT's merge(safe_merge=True) writes."""
    mini, twin = make_twins(make_mlp().to(dtype), LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2", "4"]))
    minilora.merge_and_unload(mini, safe=True)
    plain = twin.merge_and_unload(safe_merge=True)
    ours, theirs = mini.state_dict(), plain.state_dict()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), f"{key}: {max_abs_diff(ours[key], theirs[key]):.3e}"


@pytest.mark.parametrize("use_rslora", [False, True])
def test_scaling_and_rslora_match_peft(use_rslora):
    mini, twin = make_twins(make_tiny_gpt2(), LoraConfig(r=4, lora_alpha=12, use_rslora=use_rslora))
    theirs = twin.base_model.model.transformer.h[0].attn.c_attn
    ours = mini.transformer.h[0].attn.c_attn
    assert ours.scaling == theirs.scaling == {"default": 12 / (2 if use_rslora else 4)}
    assert ours.r == theirs.r and ours.lora_alpha == theirs.lora_alpha
    assert torch.equal(ours.delta_weight("default"), theirs.get_delta_weight("default"))


# ------------------------------------------------------------------------------------------------
# One layer against PEFT's lora.Linear, over shapes, ranks, scalings, layouts and dtypes
# ------------------------------------------------------------------------------------------------
@settings(max_examples=25)
@given(
    kind=st.sampled_from(["Linear", "Conv1D"]),
    in_features=st.integers(1, 40),
    out_features=st.integers(1, 40),
    r=st.integers(1, 16),
    lora_alpha=st.sampled_from([1, 3, 8, 16, 48]),
    use_rslora=st.booleans(),
    init=st.sampled_from([True, "gaussian", False]),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]),
    seed=st.integers(0, 2**16),
)
def test_one_layer_equals_peft_bitwise(kind, in_features, out_features, r, lora_alpha, use_rslora, init, dtype, seed):
    """Same seed: the same A and B; then (with random B) the same output, delta weight and merged weight."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layer = nn.Linear(in_features, out_features) if kind == "Linear" else Conv1D(out_features, in_features)
    base = nn.Sequential(layer).to(dtype)
    config = LoraConfig(r=r, lora_alpha=lora_alpha, use_rslora=use_rslora, init_lora_weights=init,
                        target_modules=["0"])
    mini, twin, _, _ = same_seed_pair(base, config, seed=seed)
    assert_same_adapters(mini, twin, torch.float32 if dtype in HALF_DTYPES else dtype)

    randomize_adapters(mini, seed=seed, std=0.3)
    copy_adapters_to_peft(mini, twin)
    x = torch.randn(3, in_features, generator=torch.Generator().manual_seed(seed)).to(dtype)  # (B, in)
    ours_layer, theirs_layer = mini[0], twin.base_model.model[0]
    with torch.no_grad():
        ours, theirs = mini(x), twin(x)
        assert torch.equal(ours, theirs), f"outputs differ by {max_abs_diff(ours, theirs):.3e}"
        assert torch.equal(ours_layer.delta_weight("default"), theirs_layer.get_delta_weight("default"))
        ours_layer.merge()
        theirs_layer.merge()
        assert torch.equal(ours_layer.base_layer.weight, theirs_layer.base_layer.weight)
        ours_layer.unmerge()
        theirs_layer.unmerge()
        assert torch.equal(ours_layer.base_layer.weight, theirs_layer.base_layer.weight)
