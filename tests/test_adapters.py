"""Adapter files in PEFT's format, both directions, with PEFT as the oracle.

minilora -> PEFT: ``peft.PeftModel.from_pretrained`` loads what ``minilora.save_adapter`` wrote, warns
no more than for its own files, and gives the minilora model's logits.
PEFT -> minilora: ``minilora.load_adapter`` reads what ``save_pretrained`` wrote (safetensors and the older
.bin) and gives the PEFT model's logits. Tolerance: 1e-6 absolute on float32 logits (the same
operations in the same order; in practice the difference is 0).
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

import minilora
from conftest import DEVICES
from minilora.adapters import CONFIG_NAME, LEGACY_WEIGHTS_NAME, WEIGHTS_NAME
from parity.twins import copy_adapters_to_peft, make_twins, max_abs_diff, peft_config, peft_key, randomize_adapters

ATOL = 1e-6


class TwoLayerNet(nn.Module):
    """Plain nn.Linear layers (weight stored (out, in)), with biases."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 20)
        self.fc2 = nn.Linear(20, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def linear_net(device: str = "cpu") -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return TwoLayerNet().to(device).eval()


def peft_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    """The warnings PEFT itself raised (not, e.g., transformers' deprecation notices)."""
    return [f"{w.category.__name__}: {w.message}" for w in caught if "/peft/" in w.filename.replace("\\", "/")]


def load_with_peft(base: nn.Module, directory) -> tuple[nn.Module, list[str]]:
    import peft

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(base, str(directory))
    return model, peft_warnings(caught)


def test_files_are_peft_files(tiny_gpt2, tmp_path):
    """Same adapter saved by both: same file names, keys, tensors, metadata, and config values."""
    config = minilora.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"])
    mini, twin = make_twins(tiny_gpt2, config)
    minilora.save_adapter(mini, tmp_path / "mini")
    twin.save_pretrained(str(tmp_path / "peft"))

    written = {p.name for p in (tmp_path / "mini").iterdir()}
    assert written == {WEIGHTS_NAME, CONFIG_NAME}
    assert written <= {p.name for p in (tmp_path / "peft").iterdir()}  # PEFT adds a README.md model card
    ours, theirs = load_file(tmp_path / "mini" / WEIGHTS_NAME), load_file(tmp_path / "peft" / WEIGHTS_NAME)
    assert sorted(ours) == sorted(theirs)
    assert "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight" in ours
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key
    with safe_open(tmp_path / "mini" / WEIGHTS_NAME, "pt") as ours_file, \
            safe_open(tmp_path / "peft" / WEIGHTS_NAME, "pt") as theirs_file:
        # minilora adds the digest that binds the weights to their config, and the config's text (minilora/files.py)
        assert theirs_file.metadata() == {"format": "pt"}
        assert ours_file.metadata().keys() == {"format", "minilora_config_sha256", "minilora_config"}
        assert ours_file.metadata()["format"] == "pt"
        assert ours_file.metadata()["minilora_config"] == (tmp_path / "mini" / CONFIG_NAME).read_text()

    ours = json.loads((tmp_path / "mini" / CONFIG_NAME).read_text())
    theirs = json.loads((tmp_path / "peft" / CONFIG_NAME).read_text())
    assert ours["target_modules"] == sorted(theirs["target_modules"])  # PEFT writes a set, in any order
    for field in sorted(set(ours) - {"target_modules"}):
        assert ours[field] == theirs[field], field


@pytest.mark.parametrize("adapter", ["default", "other", "weight", "lora_A"])
def test_file_key_is_pefts(adapter):
    """One mapping from the model's keys to the file's, for A and B and for saved modules alike, and it is
    PEFT's own (tuners_utils._remove_adapter_name_from_state_dict_key), including a module that happens
    to bear the adapter's name."""
    from peft.tuners.tuners_utils import _remove_adapter_name_from_state_dict_key

    from minilora.adapters import file_key  # (defined in adapter_files.py; saved_embeddings.py uses it too)

    keys = [f"transformer.h.0.attn.c_attn.lora_A.{adapter}.weight", f"transformer.h.0.attn.c_attn.lora_B.{adapter}.bias",
            f"score.modules_to_save.{adapter}.weight", f"lm_head.modules_to_save.{adapter}.bias",
            "lm_head.original_module.weight", f"transformer.{adapter}.c_attn.lora_A.{adapter}.weight",
            f"trainable_tokens.{adapter}", "bias", f"{adapter}.weight", "transformer.h.0.ln_1.bias"]
    for key in keys:
        assert file_key(key, adapter) == _remove_adapter_name_from_state_dict_key(key, adapter), key


@pytest.mark.usefixtures("one_thread")  # (one run of the full suite saw the twins 4.5e-5 apart with 2 threads)
def test_gpt2_round_trips_both_directions(gpt2_pair, tmp_path):
    """GPT-2 small, r=8 on c_attn and c_proj, non-zero adapters: each library loads the other's file.

    Each side is unloaded back to its base model (W0 untouched, never merged) and loads the other
    side's file: no third copy of GPT-2 small.
    """
    import peft

    ours, theirs = gpt2_pair
    config = minilora.LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj"])
    minilora.inject(ours, config)
    randomize_adapters(ours, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT corrects fan_in_fan_out for Conv1D
        theirs = peft.get_peft_model(theirs, peft_config(config))
    copy_adapters_to_peft(ours, theirs)
    assert all(layer.lora_B["default"].weight.abs().min() > 0 for _, layer in minilora.lora_layers(ours))  # visible update
    x = torch.randint(0, 50257, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ours(x).logits
        assert max_abs_diff(theirs(x).logits, expected) <= ATOL  # the twins agree before any file is written
    minilora.save_adapter(ours, tmp_path / "mini")
    theirs.save_pretrained(str(tmp_path / "peft"))

    from_mini, peft_noise = load_with_peft(theirs.unload(), tmp_path / "mini")
    with torch.no_grad():
        diff = max_abs_diff(from_mini(x).logits, expected)
    print(f"minilora file -> PEFT: max |logits diff| = {diff:.3g}")
    assert diff <= ATOL
    assert peft_noise == []

    from_peft = minilora.load_adapter(minilora.unload(ours), tmp_path / "peft")
    with torch.no_grad():
        diff = max_abs_diff(from_peft(x).logits, expected)
    print(f"PEFT file -> minilora: max |logits diff| = {diff:.3g}")
    assert diff <= ATOL


def test_minilora_file_warns_peft_no_more_than_its_own(tiny_gpt2, tmp_path):
    config = minilora.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"])
    mini, twin = make_twins(tiny_gpt2, config)
    minilora.save_adapter(mini, tmp_path / "mini")
    twin.save_pretrained(str(tmp_path / "peft"))
    _, from_mini = load_with_peft(copy.deepcopy(tiny_gpt2), tmp_path / "mini")
    _, from_peft = load_with_peft(copy.deepcopy(tiny_gpt2), tmp_path / "peft")
    assert from_mini == from_peft == []


CONFIGS = {
    "plain": minilora.LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"]),
    "rslora-gaussian-dropout": minilora.LoraConfig(r=3, lora_alpha=5, lora_dropout=0.2, use_rslora=True,
                                                   init_lora_weights="gaussian", target_modules=["fc2"]),
    "bias-all": minilora.LoraConfig(r=2, lora_alpha=4, bias="all", target_modules=["fc1"]),
    "bias-lora-only": minilora.LoraConfig(r=2, lora_alpha=4, bias="lora_only", target_modules=["fc2"]),
}


def _train_biases(model: nn.Module, seed: int) -> None:
    """Stand-in for training with bias != "none": change every bias that the config lets train."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad and param.ndim == 1:
                param.add_(torch.randn(param.shape, generator=generator).to(param.device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("safe_serialization", [True, False], ids=["safetensors", "bin"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_linear_round_trips(name, safe_serialization, device, tmp_path):
    """nn.Linear model: minilora -> minilora, minilora -> PEFT and PEFT -> minilora all give equal outputs."""
    config = CONFIGS[name]
    mini, twin = make_twins(linear_net(device), config, seed=1)
    _train_biases(mini, seed=2)
    twin.load_state_dict({f"base_model.model.{k}": v for k, v in mini.state_dict().items()
                          if not (".lora_A." in k or ".lora_B." in k)}, strict=False)
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        expected = mini(x)
        assert max_abs_diff(twin(x), expected) <= ATOL  # the twins agree before any file is written
    minilora.save_adapter(mini, tmp_path / "mini", safe_serialization=safe_serialization)
    twin.save_pretrained(str(tmp_path / "peft"), safe_serialization=safe_serialization)
    weights = WEIGHTS_NAME if safe_serialization else LEGACY_WEIGHTS_NAME
    assert {p.name for p in (tmp_path / "mini").iterdir()} == {weights, CONFIG_NAME}

    for directory in ("mini", "peft"):
        fresh = minilora.load_adapter(linear_net(device), tmp_path / directory)
        with torch.no_grad():
            assert max_abs_diff(fresh(x), expected) <= ATOL, directory
    from_mini, noise = load_with_peft(linear_net(device), tmp_path / "mini")
    assert noise == []
    with torch.no_grad():
        assert max_abs_diff(from_mini(x), expected) <= ATOL


def test_load_into_matching_layers_keeps_parameters(tiny_gpt2, tmp_path):
    """A model with its own (untrained) layers gets the file's A, B and scaling in those same tensors."""
    trained = copy.deepcopy(tiny_gpt2)
    minilora.inject(trained, minilora.LoraConfig(r=4, lora_alpha=16, target_modules=["c_attn"]))
    randomize_adapters(trained, seed=5)
    minilora.save_adapter(trained, tmp_path)

    minilora.inject(tiny_gpt2, minilora.LoraConfig(r=4, lora_alpha=4, target_modules=["c_attn"]))
    before = {name: param for name, param in tiny_gpt2.named_parameters()}
    minilora.load_adapter(tiny_gpt2, tmp_path)
    x = torch.arange(10).reshape(1, 10)
    with torch.no_grad():
        assert max_abs_diff(tiny_gpt2(x).logits, trained(x).logits) <= ATOL
    assert all(param is before[name] for name, param in tiny_gpt2.named_parameters())
    assert all(layer.scaling == {"default": 16 / 4} for _, layer in minilora.lora_layers(tiny_gpt2))
    assert tiny_gpt2.minilora_configs["default"].lora_alpha == 16  # save_adapter now writes what was loaded


@pytest.mark.parametrize("into_layers", [False, True], ids=["inject", "into-layers"])
def test_loading_reads_the_models_state_dict_a_fixed_number_of_times(tiny_gpt2, tmp_path, monkeypatch, into_layers):
    """The checks build the model's state_dict a fixed number of times, however many tensors the adapter holds
    (it took one per tensor: a 308-tensor Llama adapter loaded in 4.5 s, 0.17 s now)."""
    calls = []
    state_dict = nn.Module.state_dict

    def counted(self, *args, **kwargs):
        calls.append(self)
        return state_dict(self, *args, **kwargs)

    counts = []
    for targets in (["c_attn"], ["c_attn", "c_proj", "c_fc"]):
        trained = copy.deepcopy(tiny_gpt2)
        minilora.inject(trained, minilora.LoraConfig(r=2, target_modules=targets))
        minilora.save_adapter(trained, tmp_path / "-".join(targets))
        model = trained if into_layers else copy.deepcopy(tiny_gpt2)
        monkeypatch.setattr(nn.Module, "state_dict", counted)
        minilora.load_adapter(model, tmp_path / "-".join(targets))
        monkeypatch.undo()
        counts.append(sum(module is model for module in calls))
        calls.clear()
    assert counts[0] == counts[1] < 20, counts


def test_is_trainable(tiny_gpt2, tmp_path):
    """As PEFT: loaded adapters are frozen unless is_trainable=True, which trains A and B only."""
    trained = copy.deepcopy(tiny_gpt2)
    minilora.inject(trained, minilora.LoraConfig(r=2, target_modules=["c_attn"]))
    minilora.save_adapter(trained, tmp_path)
    frozen = minilora.load_adapter(copy.deepcopy(tiny_gpt2), tmp_path)
    assert not any(p.requires_grad for p in frozen.parameters())
    trainable = minilora.load_adapter(tiny_gpt2, tmp_path, is_trainable=True)
    names = {n for n, p in trainable.named_parameters() if p.requires_grad}
    assert names == {n for n, _ in trainable.named_parameters() if ".lora_A." in n or ".lora_B." in n}
    assert len(names) == 4


def test_state_dict_of_peft_model_loads_into_matching_layers(tiny_gpt2):
    """PEFT's in-memory keys are minilora's (lora_A.default.weight), behind PEFT's base_model.model. prefix."""
    config = minilora.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"])
    mini, twin = make_twins(tiny_gpt2, config, seed=7)
    target = copy.deepcopy(tiny_gpt2)
    minilora.inject(target, config)
    peft_state = {k: v for k, v in twin.state_dict().items() if ".lora_" in k}
    assert peft_key("transformer.h.0.attn.c_attn.lora_A.default.weight") in peft_state
    minilora.load_adapter(target, peft_state)
    x = torch.arange(8).reshape(1, 8)
    with torch.no_grad():
        assert max_abs_diff(target(x).logits, twin(x).logits) <= ATOL


def test_saving_one_format_removes_the_other(tiny_gpt2, tmp_path):
    """Readers prefer safetensors, so a stale one must not shadow a newer .bin (and the reverse)."""
    minilora.inject(tiny_gpt2, minilora.LoraConfig(r=2, target_modules=["c_attn"]))
    minilora.save_adapter(tiny_gpt2, tmp_path)
    minilora.save_adapter(tiny_gpt2, tmp_path, safe_serialization=False)
    assert {p.name for p in tmp_path.iterdir()} == {LEGACY_WEIGHTS_NAME, CONFIG_NAME}
    minilora.save_adapter(tiny_gpt2, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {WEIGHTS_NAME, CONFIG_NAME}


def test_unknown_config_field_one_warning(tiny_gpt2, tmp_path):
    """A field from a newer PEFT: one warning naming it, and the adapter loads as if it were absent."""
    trained = copy.deepcopy(tiny_gpt2)
    minilora.inject(trained, minilora.LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False))
    minilora.save_adapter(trained, tmp_path)
    fields = json.loads((tmp_path / CONFIG_NAME).read_text())
    fields["lora_from_the_future"] = {"mode": 3}
    (tmp_path / CONFIG_NAME).write_text(json.dumps(fields))
    with pytest.warns(UserWarning, match="lora_from_the_future") as caught:
        minilora.load_adapter(tiny_gpt2, tmp_path)
    assert len(caught) == 1
    x = torch.arange(6).reshape(1, 6)
    with torch.no_grad():
        assert max_abs_diff(tiny_gpt2(x).logits, trained(x).logits) <= ATOL


# The fields of LoraConfig (with PeftConfig's) in peft 0.6.2: releases 0.6 to 0.12 raise TypeError on
# any other field in adapter_config.json (measured in docs/peft-versions.md), so minilora writes no other.
PEFT_0_6_FIELDS = {
    "peft_type", "auto_mapping", "base_model_name_or_path", "revision", "task_type", "inference_mode",
    "r", "target_modules", "lora_alpha", "lora_dropout", "fan_in_fan_out", "bias", "modules_to_save",
    "init_lora_weights", "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern",
}


@pytest.mark.parametrize("use_rslora", [False, True])
def test_adapter_config_is_readable_by_old_peft_releases(tiny_gpt2, tmp_path, use_rslora):
    """Only fields PEFT 0.6 knows are written; use_rslora (PEFT >= 0.7) only when it is on."""
    minilora.inject(tiny_gpt2, minilora.LoraConfig(r=2, target_modules=["c_attn"], use_rslora=use_rslora))
    minilora.save_adapter(tiny_gpt2, tmp_path)
    fields = set(json.loads((tmp_path / CONFIG_NAME).read_text()))
    assert fields - PEFT_0_6_FIELDS == ({"use_rslora"} if use_rslora else set())


@pytest.mark.parametrize("safe_serialization", [True, False])
def test_save_on_the_fused_path_writes_only_the_adapter(tiny_gpt2, tmp_path, safe_serialization):
    """On the fused path lora_A is a view into [W0; A]; the file must hold A alone, not W0's buffer."""
    minilora.inject(tiny_gpt2, minilora.LoraConfig(r=2, target_modules=["c_attn"]))
    minilora.set_forward_path(tiny_gpt2, "fused")
    minilora.save_adapter(tiny_gpt2, tmp_path, safe_serialization=safe_serialization)
    name = WEIGHTS_NAME if safe_serialization else LEGACY_WEIGHTS_NAME
    stored = load_file(tmp_path / name) if safe_serialization else torch.load(tmp_path / name)
    adapter_numbers = sum(layer.lora_A["default"].weight.numel() + layer.lora_B["default"].weight.numel()
                          for _, layer in minilora.lora_layers(tiny_gpt2))
    assert sum(t.untyped_storage().nbytes() for t in stored.values()) == adapter_numbers * 4  # float32
