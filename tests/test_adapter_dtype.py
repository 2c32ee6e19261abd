"""Adapters in float16 / bfloat16: ``autocast_adapter_dtype``, against PEFT as the oracle.

PEFT builds A and B in the base layer's dtype and then, with ``autocast_adapter_dtype=True`` (its
default), casts float16 / bfloat16 adapters up to float32; with False they stay in the base dtype and
forward runs in half precision (``x`` cast to A's dtype, the sum cast back to the base output's dtype).
minilora runs the same operations in the same order on the CPU, so every comparison here is exact
(tolerance 0): same-seed weights, eval outputs, gradients, merged weights, loaded weights.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import minilora
from conftest import DEVICES, make_tiny_gpt2, record_model
from minilora import LoraConfig, MiniLoraError
from parity.twins import adapter_state, copy_adapters_to_peft, max_abs_diff, peft_config, peft_key, randomize_adapters

HALF = [torch.float16, torch.bfloat16]
dtype_ids = lambda d: str(d).removeprefix("torch.")  # noqa: E731


def make_mlp() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4)).eval()


# name -> (base model, target_modules, input batch); the GPT-2 is Conv1D (fan_in_fan_out)
MODELS = {
    "mlp": (make_mlp, ["0", "2"], lambda: torch.randn(5, 16, generator=torch.Generator().manual_seed(5))),
    "tiny_gpt2": (make_tiny_gpt2, ["c_attn", "c_fc"],
                  lambda: torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(5))),
}


def twins(model_name: str, dtype: torch.dtype, autocast: bool, seed: int = 0, device: str = "cpu"):
    """(minilora model, PEFT model), both ``dtype`` on ``device``, each given LoRA from the same seed."""
    import peft

    make, targets, _ = MODELS[model_name]
    base = make().to(device, dtype)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets)
    mini, twin = copy.deepcopy(base), copy.deepcopy(base)
    torch.manual_seed(seed)
    minilora.inject(mini, config, autocast_adapter_dtype=autocast)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's fan_in_fan_out notice for Conv1D
        twin = peft.get_peft_model(twin, peft_config(config), autocast_adapter_dtype=autocast)
    return mini, twin


def inputs(model_name: str, dtype: torch.dtype, device: str = "cpu") -> torch.Tensor:
    x = MODELS[model_name][2]()
    return (x.to(dtype) if x.is_floating_point() else x).to(device)


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out.logits if hasattr(out, "logits") else out


def assert_equal_to_peft(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], dtype: torch.dtype):
    assert ours and sorted(peft_key(k) for k in ours) == sorted(theirs)
    for key, value in ours.items():
        other = theirs[peft_key(key)]
        assert value.dtype == other.dtype == dtype, key
        assert torch.equal(value, other), f"{key}: max |diff| = {max_abs_diff(value, other):.3e}"


def peft_adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if ".lora_A." in k or ".lora_B." in k}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("autocast", [True, False])
@pytest.mark.parametrize("dtype", HALF, ids=dtype_ids)
@pytest.mark.parametrize("model_name", MODELS)
def test_same_seed_adapter_dtype_and_values_equal_peft(model_name, dtype, autocast, device):
    """True: float32 A and B (the init rounded through the base dtype first); False: A and B in the base dtype."""
    mini, twin = twins(model_name, dtype, autocast, device=device)
    assert_equal_to_peft(adapter_state(mini), peft_adapter_state(twin), torch.float32 if autocast else dtype)
    for _, layer in minilora.lora_layers(mini):
        assert layer.base_layer.weight.dtype == dtype


@pytest.mark.parametrize("model_name", MODELS)
def test_float32_base_ignores_autocast(model_name):
    """Only float16 / bfloat16 adapters are cast: a float32 model gets float32 adapters either way."""
    mini, twin = twins(model_name, torch.float32, autocast=False)
    assert_equal_to_peft(adapter_state(mini), peft_adapter_state(twin), torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("autocast", [True, False])
@pytest.mark.parametrize("dtype", HALF, ids=dtype_ids)
@pytest.mark.parametrize("model_name", MODELS)
def test_half_outputs_gradients_and_merge_equal_peft(model_name, dtype, autocast, device):
    """Equal non-zero adapters: eval outputs, LoRA gradients, merged W0 and merged outputs bitwise equal
    (the same operations in the same order on either device; PEFT multiplies half B A in float32 on the CPU only)."""
    mini, twin = twins(model_name, dtype, autocast, device=device)
    randomize_adapters(mini, seed=1)  # copies in float64 -> rounded to the adapter dtype
    copy_adapters_to_peft(mini, twin)
    x = inputs(model_name, dtype, device)
    with torch.no_grad():
        ours, theirs = logits(mini, x), logits(twin, x)
        with minilora.disabled(mini):
            base = logits(mini, x)
    assert ours.dtype == theirs.dtype == dtype
    assert torch.equal(ours, theirs), f"outputs differ by {max_abs_diff(ours, theirs):.3e}"
    assert not torch.equal(ours, base), "the adapters should change the outputs"

    for model in (mini, twin):
        logits(model, x).float().square().mean().backward()
    grads = {n: p.grad for n, p in mini.named_parameters() if p.requires_grad}
    peft_grads = {n: p.grad for n, p in twin.named_parameters() if p.requires_grad}
    assert_equal_to_peft(grads, peft_grads, torch.float32 if autocast else dtype)

    minilora.merge(mini)
    twin.merge_adapter()
    merged = {n: p for n, p in mini.state_dict().items() if n.endswith("base_layer.weight")}
    peft_merged = {n: p for n, p in twin.state_dict().items() if n.endswith("base_layer.weight")}
    assert_equal_to_peft(merged, peft_merged, dtype)
    with torch.no_grad():
        assert torch.equal(logits(mini, x), logits(twin, x))


@pytest.mark.parametrize("autocast", [True, False])
@pytest.mark.parametrize("dtype", HALF, ids=dtype_ids)
def test_add_and_load_adapter_follow_autocast_like_peft(tmp_path, dtype, autocast):
    """add_adapter and load_adapter build A and B in the dtype PEFT's add_adapter / load_adapter give,
    and a PEFT file loaded with autocast_adapter_dtype=False holds the same half values as PEFT's load."""
    import peft

    mini, twin = twins("mlp", dtype, autocast)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["0"])
    torch.manual_seed(3)
    minilora.add_adapter(mini, "other", config, autocast_adapter_dtype=autocast)
    torch.manual_seed(3)
    twin.add_adapter("other", peft_config(config), autocast_adapter_dtype=autocast)
    assert_equal_to_peft(adapter_state(mini), peft_adapter_state(twin), torch.float32 if autocast else dtype)

    randomize_adapters(mini, seed=2)
    copy_adapters_to_peft(mini, twin)
    twin.save_pretrained(tmp_path)  # PEFT writes the adapters in their own dtype
    fresh = make_mlp().to(dtype)
    minilora.load_adapter(fresh, tmp_path, adapter_name="default", autocast_adapter_dtype=autocast)
    minilora.load_adapter(fresh, tmp_path / "other", adapter_name="other", autocast_adapter_dtype=autocast)
    loaded = peft.PeftModel.from_pretrained(make_mlp().to(dtype), tmp_path, autocast_adapter_dtype=autocast)
    loaded.load_adapter(tmp_path / "other", adapter_name="other", autocast_adapter_dtype=autocast)
    assert_equal_to_peft(adapter_state(fresh), peft_adapter_state(loaded), torch.float32 if autocast else dtype)


@pytest.mark.parametrize("bad", ["false", 0, None])
def test_autocast_must_be_a_bool_and_nothing_changes(bad):
    """A string "false" would read as true: refused before the model is touched, by every entry point."""
    base = make_mlp().half()
    check = record_model(base)
    config = LoraConfig(target_modules=["0"])
    with pytest.raises(MiniLoraError, match="autocast_adapter_dtype must be True or False"):
        minilora.inject(base, config, autocast_adapter_dtype=bad)
    check()
    minilora.inject(base, config)
    check = record_model(base)
    with pytest.raises(MiniLoraError, match="autocast_adapter_dtype must be True or False"):
        minilora.add_adapter(base, "other", LoraConfig(target_modules=["2"]), autocast_adapter_dtype=bad)
    check()
    with pytest.raises(MiniLoraError, match="autocast_adapter_dtype must be True or False"):
        minilora.load_adapter(base, {}, adapter_name="other", autocast_adapter_dtype=bad)
    check()
