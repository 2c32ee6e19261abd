"""PEFT's two classic pitfalls, measured in PEFT and made impossible in minilora.

1. ``get_peft_model(model)`` then ``PeftModel.from_pretrained(that_model, directory)``: PEFT wraps twice,
   which doubles every key's prefix, so no key of the file matches and the fresh adapters (B = 0) give
   the base model's outputs. minilora has no wrapper: the trained adapter's outputs.
2. ``torch.save(model)`` (the whole object) then ``load_state_dict`` / ``load_adapter`` with what
   ``torch.load`` returns: PyTorch's ``TypeError: Expected state_dict to be dict-like``; minilora's own
   error that names the two consistent pairs.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import minilora
from minilora import MiniLoraError
from conftest import make_tiny_gpt2
from minilora.compat import LoraConfig, PeftModel, get_peft_model
from parity.twins import make_twins, max_abs_diff, peft_config, randomize_adapters

CONFIG = dict(r=4, lora_alpha=8, target_modules=["c_attn"])
X = torch.arange(10).reshape(1, 10)


def logits(model):
    with torch.no_grad():
        return model(X).logits


def test_pitfall_1_peft_gives_base_outputs(tiny_gpt2, tmp_path):
    """What PEFT itself does (measured on the installed release, not assumed)."""
    import peft

    _, twin = make_twins(tiny_gpt2, minilora.LoraConfig(**CONFIG), seed=1)
    twin.save_pretrained(str(tmp_path))
    trained = logits(twin)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = peft.get_peft_model(copy.deepcopy(tiny_gpt2), peft_config(minilora.LoraConfig(**CONFIG)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        twice = peft.PeftModel.from_pretrained(wrapped, str(tmp_path))
    messages = [str(w.message) for w in caught]
    to_base, to_trained = max_abs_diff(logits(twice), logits(tiny_gpt2)), max_abs_diff(logits(twice), trained)
    print(f"peft {peft.__version__}: |out - base| = {to_base:.3g}, |out - trained| = {to_trained:.3g}, "
          f"missing-keys warning: {any('missing adapter keys' in m for m in messages)}")
    assert to_base <= 1e-6 and to_trained > 1e-3, "PEFT no longer falls into pitfall 1: update the README"
    assert any("missing adapter keys" in m for m in messages)
    assert all(key.startswith("base_model.model.base_model.model.") for key in twice.state_dict())  # wrapped twice


def test_pitfall_1_minilora_gives_trained_outputs(tiny_gpt2, tmp_path, recwarn):
    trained = get_peft_model(copy.deepcopy(tiny_gpt2), LoraConfig(**CONFIG))
    randomize_adapters(trained, seed=1)
    trained.save_pretrained(tmp_path)

    model = get_peft_model(copy.deepcopy(tiny_gpt2), LoraConfig(**CONFIG))  # as the article's training script
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    model = PeftModel.from_pretrained(model, tmp_path)                       # ... and then its inference script
    assert max_abs_diff(logits(model), logits(trained)) <= 1e-6
    assert max_abs_diff(logits(model), logits(tiny_gpt2)) > 1e-3
    assert len(list(minilora.lora_layers(model))) == 2  # loaded into its layers, not wrapped again
    model_params = {id(p) for p in model.parameters()}
    assert all(id(p) in model_params for group in optimizer.param_groups for p in group["params"])
    # (only PEFT's own notice that GPT-2's Conv1D layers need fan_in_fan_out=True, which PEFT gives too)
    assert [str(w.message) for w in recwarn if "fan_in_fan_out is set to False" not in str(w.message)] == []


def test_pitfall_1_also_with_minilora_load_adapter(tiny_gpt2, tmp_path):
    """The same with minilora's own names: inject, then load_adapter, gives the file's adapter."""
    trained = minilora.inject(copy.deepcopy(tiny_gpt2), minilora.LoraConfig(**CONFIG))
    randomize_adapters(trained, seed=2)
    minilora.save_adapter(trained, tmp_path)
    model = minilora.inject(tiny_gpt2, minilora.LoraConfig(**CONFIG))
    minilora.load_adapter(model, tmp_path)
    assert max_abs_diff(logits(model), logits(trained)) <= 1e-6


@pytest.fixture
def whole_model_file(tiny_gpt2, tmp_path):
    """(model, path): an adapted model, and the file that torch.save(model) of the whole object wrote."""
    model = get_peft_model(tiny_gpt2, LoraConfig(**CONFIG, init_lora_weights=False))
    torch.save(model, tmp_path / "model.pt")
    return model, tmp_path / "model.pt"


def test_pitfall_2_pytorch_says_dict_like(whole_model_file):
    """What PyTorch itself says, on a model that did not come from minilora.compat."""
    model, path = whole_model_file
    loaded = torch.load(path, weights_only=False)
    plain = minilora.inject(make_tiny_gpt2(), minilora.LoraConfig(**CONFIG))
    with pytest.raises(TypeError, match="Expected state_dict to be dict-like"):
        plain.load_state_dict(loaded)


@pytest.mark.parametrize("load", [
    lambda model, loaded: model.load_state_dict(loaded),
    lambda model, loaded: minilora.load_adapter(model, loaded),
    lambda model, loaded: PeftModel.from_pretrained(model, loaded),
], ids=["load_state_dict", "load_adapter", "from_pretrained"])
def test_pitfall_2_minilora_explains(load, whole_model_file, unchanged):
    model, path = whole_model_file
    loaded = torch.load(path, weights_only=False)
    check = unchanged(model)
    with pytest.raises(MiniLoraError) as error:
        load(model, loaded)
    check()
    message = str(error.value)
    assert f"got a whole model ({type(loaded).__name__})" in message and "torch.save(model)" in message
    assert "minilora.save_adapter(model, directory)    ->  minilora.load_adapter(base_model, directory)" in message
    assert "torch.save(model.state_dict(), path)       ->  model.load_state_dict(torch.load(path))" in message


def test_pitfall_2_the_file_itself(whole_model_file, unchanged):
    """Passing the .pt file (or its folder) where an adapter directory is expected: the same explanation."""
    model, path = whole_model_file
    check = unchanged(model)
    with pytest.raises(MiniLoraError, match=r"(?s)is a file.*torch\.save\(model\) holds a whole model"):
        minilora.load_adapter(model, path)
    with pytest.raises(MiniLoraError, match=r"adapter_config\.json is missing"):
        minilora.load_adapter(model, path.parent)
    check()


def test_pitfall_2_the_consistent_pairs_work(whole_model_file, tmp_path):
    """The loaded object is the model itself; and each consistent pair round-trips the outputs."""
    model, path = whole_model_file
    expected = logits(model)
    loaded = torch.load(path, weights_only=False)
    assert max_abs_diff(logits(loaded), expected) == 0
    loaded.save_pretrained(tmp_path / "from_loaded")  # PEFT's methods came back bound to the loaded copy

    torch.save(model.state_dict(), tmp_path / "state.pt")
    other = get_peft_model(make_tiny_gpt2(), LoraConfig(**CONFIG))
    other.load_state_dict(torch.load(tmp_path / "state.pt"))
    assert max_abs_diff(logits(other), expected) == 0

    fresh = make_tiny_gpt2()
    minilora.load_adapter(fresh, tmp_path / "from_loaded")
    assert max_abs_diff(logits(fresh), expected) <= 1e-6
