"""minilora.compat's state-dict functions next to PEFT's (peft.get_peft_model_state_dict, ...): the
same calls on twins built from one base and seed give the same keys and tensors."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from torch import nn

from minilora import MiniLoraError, compat

from test_compat_wrapper import MLP, X, base


def twins(**fields):
    models = []
    for lib in (peft, compat):
        torch.manual_seed(1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            models.append(lib.get_peft_model(base(), lib.LoraConfig(target_modules=["lin0"], r=2,
                                                                    init_lora_weights=False, **fields)))
    return models


def same(ours: dict, theirs: dict) -> bool:
    return list(ours) == list(theirs) and all(torch.equal(ours[key], theirs[key]) for key in theirs)


@pytest.mark.parametrize("fields", [{}, {"modules_to_save": ["lin1"]}, {"bias": "lora_only"}])
def test_get_peft_model_state_dict_as_peft(fields):
    theirs, ours = twins(**fields)
    assert same(compat.get_peft_model_state_dict(ours), peft.get_peft_model_state_dict(theirs))
    given = {key: value * 2 for key, value in theirs.state_dict().items()}  # Trainer / DeepSpeed pass their own
    assert same(compat.get_peft_model_state_dict(ours, state_dict=given),
                peft.get_peft_model_state_dict(theirs, state_dict=given))


def test_set_peft_model_state_dict_as_peft():
    theirs, ours = twins()
    ours.set_adapter("default")
    state = {key: value + 1 for key, value in peft.get_peft_model_state_dict(theirs).items()}
    trainable = [name for name, param in ours.named_parameters() if param.requires_grad]
    for lib, model in ((peft, theirs), (compat, ours)):
        result = lib.set_peft_model_state_dict(model, state)
        assert not result.unexpected_keys and not [k for k in result.missing_keys if "lora_" in k], lib.__name__
    assert [name for name, param in ours.named_parameters() if param.requires_grad] == trainable
    with torch.no_grad():
        assert torch.equal(ours(X), theirs(X))
    with pytest.raises(MiniLoraError, match="ignore_mismatched_sizes"):
        compat.set_peft_model_state_dict(ours, state, ignore_mismatched_sizes=True)
    with pytest.raises(MiniLoraError):  # a key for another layer: strict, before anything changes
        compat.set_peft_model_state_dict(ours, {**state, "base_model.model.lin1.lora_A.weight": torch.ones(2, 8)})


@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_inject_adapter_in_model_as_peft(low_cpu_mem_usage):
    models, after = [], []
    for lib in (peft, compat):
        torch.manual_seed(1)
        model = lib.inject_adapter_in_model(lib.LoraConfig(target_modules=["lin0"], r=2), base(),
                                            low_cpu_mem_usage=low_cpu_mem_usage)
        after.append(torch.rand(3))  # the same numbers drawn (none with low_cpu_mem_usage)
        models.append(model)
    assert torch.equal(after[0], after[1])
    theirs, ours = models
    assert type(ours) is MLP and list(ours.state_dict()) == list(theirs.state_dict())
    assert [(n, p.requires_grad) for n, p in ours.named_parameters()] == \
        [(n, p.requires_grad) for n, p in theirs.named_parameters()]
    assert ours.lin0.training == theirs.lin0.training
    assert [(n, p.device.type) for n, p in ours.named_parameters()] == \
        [(n, p.device.type) for n, p in theirs.named_parameters()]  # meta placeholders with low_cpu_mem_usage
    if not low_cpu_mem_usage:
        assert same(ours.state_dict(), theirs.state_dict())
        return
    state = peft.get_peft_model_state_dict(twins()[0])  # now load the placeholders, as PEFT's docs say
    with pytest.raises(MiniLoraError):  # a missing key: refused, and the placeholders stay placeholders
        compat.set_peft_model_state_dict(ours, dict(list(state.items())[:1]), low_cpu_mem_usage=True)
    assert ours.lin0.lora_A["default"].weight.is_meta
    peft.set_peft_model_state_dict(theirs, state, low_cpu_mem_usage=True)
    compat.set_peft_model_state_dict(ours, state, low_cpu_mem_usage=True)
    assert same(ours.state_dict(), theirs.state_dict())
    assert [(n, p.requires_grad) for n, p in ours.named_parameters()] == \
        [(n, p.requires_grad) for n, p in theirs.named_parameters()]
    with torch.no_grad():
        assert torch.equal(ours(X), theirs(X))


def test_base_model_state_dict_as_peft():
    theirs, ours = twins(modules_to_save=["lin1"])
    for lib, model in ((peft, theirs), (compat, ours)):
        model.merge_adapter()  # W0 + dW: what the base keys hold while merged
    base_state = peft.get_base_model_state_dict(theirs)
    assert same(compat.get_base_model_state_dict(ours), base_state)
    assert list(base_state) == list(MLP().state_dict())
    fresh = {key: torch.zeros_like(value) for key, value in base_state.items()}
    for lib, model in ((peft, theirs), (compat, ours)):
        result = lib.set_base_model_state_dict(model, fresh)
        assert not result.missing_keys and not result.unexpected_keys
    assert same(compat.get_base_model_state_dict(ours), peft.get_base_model_state_dict(theirs))
    with pytest.raises(MiniLoraError, match="unexpected keys \\['extra'\\]"):
        compat.set_base_model_state_dict(ours, {**fresh, "extra": torch.ones(1)})


def _injected_from(lib, architecture: str, state_dict, config: dict):
    from parity.architectures import ARCHITECTURES

    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        given = lib.LoraConfig(**config)
        model = lib.inject_adapter_in_model(given, ARCHITECTURES[architecture].build(), state_dict=state_dict)
    runtime = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    return model, runtime, given.target_modules


@pytest.mark.parametrize("architecture", ["llama", "bert"])
@pytest.mark.parametrize("subset", [False, True])
def test_inject_adapter_in_model_from_a_state_dict_as_peft(architecture, subset):
    """inject_adapter_in_model(state_dict=...): the layers its keys name are wrapped (not the config's targets),
    with PEFT's RuntimeWarning when they differ and none when they agree; same keys, shapes, stored targets."""
    from parity.architectures import ARCHITECTURES

    source = peft.inject_adapter_in_model(peft.LoraConfig(r=4), ARCHITECTURES[architecture].build())
    state_dict = peft.get_peft_model_state_dict(source)
    if subset:  # the first block's query layer only: the file decides the layers
        state_dict = {key: value for key, value in state_dict.items()
                      if ".0." in key and ("q_proj" in key or "query" in key)}
    results = {lib: _injected_from(lib, architecture, state_dict, dict(r=4)) for lib in (peft, compat)}
    (theirs, their_warnings, their_targets), (ours, our_warnings, our_targets) = results[peft], results[compat]
    expected = peft.get_peft_model_state_dict(theirs)
    got = compat.get_peft_model_state_dict(ours)
    assert list(got) == list(expected) == list(state_dict)
    assert all(got[key].shape == expected[key].shape for key in expected)
    assert our_warnings == their_warnings and bool(their_warnings) == subset
    assert our_targets == their_targets  # the config's own (default) targets, written into it by both


def test_inject_adapter_in_model_from_a_state_dict_naming_no_layer_is_refused():
    for lib in (peft, compat):
        with pytest.raises(ValueError):
            _injected_from(lib, "llama", {"no.such.layer.lora_A.weight": torch.zeros(4, 32)}, dict(r=4))
