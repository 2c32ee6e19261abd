"""The names PEFT's code reads on a config and on a LoRA layer (minilora/peft_attributes.py), each
compared with what the installed PEFT answers for the same model and config."""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import torch
from torch import nn

import minilora
from conftest import make_tiny_gpt2, record_model
from minilora import LoraConfig, MiniLoraError
from minilora import compat
from parity.twins import copy_adapters_to_peft, peft_config, randomize_adapters

CONFIG_CLASSES = [LoraConfig, compat.LoraConfig]


def peft_version():
    import peft

    return peft.__version__


def peft_lora_config(**fields):
    import peft

    return peft.LoraConfig(**fields)


# ------------------------------------------------------------------------------------------------
# The config
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config_cls", CONFIG_CLASSES)
def test_config_answers_like_peft(config_cls):
    import peft

    ours, theirs = config_cls(target_modules=["q", "v"]), peft_lora_config(target_modules=["q", "v"])
    assert ours.peft_type == theirs.peft_type == "LORA" and ours.peft_type.value == "LORA"
    assert {peft.PeftType.LORA: "found"}[ours.peft_type] == "found"  # PEFT's tables keyed by peft type
    assert ours.peft_type in {"LORA", "IA3"}
    for name in ("is_prompt_learning", "is_adaption_prompt"):
        assert getattr(ours, name) is getattr(theirs, name) is False


@pytest.mark.parametrize("config_cls", CONFIG_CLASSES)
def test_to_dict_holds_peft_values_for_every_field(config_cls):
    """Every key of ours is one of PEFT's, with PEFT's value (PEFT keeps target_modules as a set)."""
    fields = dict(r=4, lora_alpha=16, lora_dropout=0.1, target_modules=["q", "v"], bias="lora_only",
                  use_rslora=True, rank_pattern={"q": 2}, layers_to_transform=[0], layers_pattern="layers")
    ours, theirs = config_cls(**fields).to_dict(), peft_lora_config(**fields).to_dict()
    assert set(ours) <= set(theirs)
    assert {"peft_type", "r", "lora_alpha", "target_modules", "rank_pattern"} <= set(ours)
    for key, value in ours.items():
        expected = theirs[key]
        if key == "target_modules" and not isinstance(value, set):  # (minilora.LoraConfig: a sorted list;
            expected = sorted(expected)                               # compat's keeps PEFT's set)
        if key == "fan_in_fan_out" and config_cls is minilora.LoraConfig:  # minilora's None (decide per layer);
            assert value is None and expected is False                     # compat's default is PEFT's False
            continue
        if key == "peft_version":  # PEFT stamps its release; minilora is none (the test at the end)
            assert value is None and expected == peft_version()
            continue
        assert value == expected, key


@pytest.mark.parametrize("config_cls", CONFIG_CLASSES)
def test_config_files_round_trip_with_peft_both_ways(tmp_path, config_cls):
    import peft

    fields = dict(r=4, lora_alpha=16, target_modules=["q", "v"], alpha_pattern={"v": 8}, init_lora_weights="gaussian")
    config_cls(**fields).save_pretrained(tmp_path / "ours")
    read_by_peft = peft.LoraConfig.from_pretrained(tmp_path / "ours")
    peft_lora_config(**fields).save_pretrained(tmp_path / "peft")
    read_by_us = config_cls.from_pretrained(tmp_path / "peft")
    assert type(read_by_us) is config_cls
    for name, value in fields.items():  # (PEFT writes its target_modules set as a list in set order)
        as_read = {name: set(value)} if name == "target_modules" else {name: value}
        assert {name: getattr(read_by_peft, name)} == as_read, name
        ours = getattr(read_by_us, name)
        assert {name: set(ours) if name == "target_modules" else ours} == as_read, name
    text = (tmp_path / "ours" / "adapter_config.json").read_text()
    assert json.loads(text)["peft_type"] == "LORA"
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"  # PEFT's layout
    assert config_cls.from_pretrained(tmp_path, subfolder="ours") == config_cls(**fields)
    assert config_cls.from_pretrained(tmp_path / "ours", r=2).r == 2  # keywords set fields, as in PEFT


def test_config_file_errors(tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(MiniLoraError, match="cannot be written"):
        LoraConfig().save_pretrained(tmp_path / "a_file")
    with pytest.raises(MiniLoraError, match="does not push to a hub"):
        LoraConfig().save_pretrained(tmp_path / "out", push_to_hub=True)
    assert not (tmp_path / "out").exists()
    with pytest.raises(MiniLoraError, match="is not a directory"):
        LoraConfig.from_pretrained(tmp_path / "missing")
    peft_lora_config(target_modules=["q"], use_dora=True).save_pretrained(tmp_path / "dora")
    with pytest.raises(MiniLoraError, match="DoRA"):
        compat.LoraConfig.from_pretrained(tmp_path / "dora")
    peft_lora_config(target_modules=["q"]).save_pretrained(tmp_path / "ok")
    with pytest.raises(MiniLoraError, match="not LoraConfig fields"):
        LoraConfig.from_pretrained(tmp_path / "ok", rr=2)


def test_dataclasses_replace_gives_what_peft_gives():
    """PEFT's tests build a second adapter's config with dataclasses.replace(config, r=20)."""
    ours = dataclasses.replace(compat.LoraConfig(target_modules=["q"], lora_alpha=32), r=20)
    theirs = dataclasses.replace(peft_lora_config(target_modules=["q"], lora_alpha=32), r=20)
    assert (ours.r, ours.lora_alpha, ours.scaling) == (theirs.r, theirs.lora_alpha, 32 / 20)
    with pytest.raises(MiniLoraError, match="r must be a positive int"):
        dataclasses.replace(ours, r=0)


# ------------------------------------------------------------------------------------------------
# The layer
# ------------------------------------------------------------------------------------------------
def make_mlp() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4)).eval()


@pytest.fixture(params=["mlp", "tiny_gpt2"])
def layer_pair(request):
    """(minilora layers by name, PEFT layers by name) of twin models with equal non-zero adapters."""
    import copy

    import peft

    make, targets = (make_mlp, ["0", "2"]) if request.param == "mlp" else (make_tiny_gpt2, ["c_attn", "c_fc"])
    base = make()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets)
    mini = minilora.inject(copy.deepcopy(base), config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's fan_in_fan_out notice for Conv1D
        twin = peft.get_peft_model(copy.deepcopy(base), peft_config(config))
    randomize_adapters(mini)
    copy_adapters_to_peft(mini, twin)
    theirs = {name.removeprefix("base_model.model."): module for name, module in twin.named_modules()
              if isinstance(module, peft.tuners.lora.LoraLayer)}
    return dict(minilora.lora_layers(mini)), theirs


def test_layer_answers_like_peft(layer_pair):
    ours, theirs = layer_pair
    assert ours.keys() == theirs.keys()
    for name, layer in ours.items():
        peft_layer = theirs[name]
        assert layer.get_base_layer() is layer.base_layer
        assert type(layer.get_base_layer()) is type(peft_layer.get_base_layer())
        assert (layer.in_features, layer.out_features) == (peft_layer.in_features, peft_layer.out_features)
        assert layer.use_dora == peft_layer.use_dora and layer.lora_bias == peft_layer.lora_bias
        assert layer.lora_variant == peft_layer.lora_variant == {}
        assert set(layer.adapter_layer_names) <= set(peft_layer.adapter_layer_names)
        assert set(layer.other_param_names) <= set(peft_layer.other_param_names)
        for table in (*layer.adapter_layer_names, *layer.other_param_names):
            assert set(getattr(layer, table)) == set(getattr(peft_layer, table)) == {"default"}, table
        assert torch.equal(layer.get_delta_weight("default"), peft_layer.get_delta_weight("default"))
        assert (layer.merged, layer.merged_adapters, layer.active_adapters) == \
            (peft_layer.merged, peft_layer.merged_adapters, peft_layer.active_adapters)


def test_enable_adapters_switches_and_freezes_like_peft(layer_pair):
    """Off: W0 x and frozen adapters; on again: the adapted output and trainable adapters, as PEFT's layer."""
    ours, theirs = layer_pair

    def state(layer):
        return layer.disable_adapters, layer._disable_adapters, [p.requires_grad for p in layer.lora_A.parameters()]

    for enabled in (False, True):
        for name, layer in ours.items():
            x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(0))
            layer.enable_adapters(enabled)
            theirs[name].enable_adapters(enabled)
            assert state(layer) == state(theirs[name]) == (not enabled, not enabled, [enabled])
            with torch.no_grad():
                assert torch.equal(layer(x), theirs[name](x))
                assert torch.equal(layer(x), layer.base_layer(x)) == (not enabled)


def test_disabled_layer_gives_the_base_output():
    layer = minilora.LoraLinear(nn.Linear(6, 5), r=2, init_lora_weights=False)
    x = torch.randn(4, 6)
    with torch.no_grad():
        adapted = layer(x)
        layer.enable_adapters(False)
        assert layer.disable_adapters and torch.equal(layer(x), layer.base_layer(x))
        layer.enable_adapters(True)
        assert torch.equal(layer(x), adapted) and not torch.equal(adapted, layer.base_layer(x))


def test_peft_names_change_nothing_when_read():
    model = minilora.inject(make_mlp(), LoraConfig(target_modules=["0"]))
    check = record_model(model)
    layer = model[0]
    _ = (layer.disable_adapters, layer.use_dora, layer.lora_bias, layer.get_base_layer(),
         layer.get_delta_weight("default"))
    with pytest.raises(TypeError):
        layer.use_dora["default"] = True  # read-only: nothing switches DoRA on through it
    assert layer.use_dora == {"default": False}
    check()


def test_feature_flags_follow_the_adapters_like_peft():
    """PEFT's use_dora / lora_bias dicts gain and lose an entry with each adapter; a view read before a
    delete_adapter must not still hold the deleted one (PEFT's tests look for such leftovers)."""
    import peft

    ours = minilora.inject(make_mlp(), LoraConfig(target_modules=["0"]), adapter_name="first")
    theirs = peft.get_peft_model(make_mlp(), peft_lora_config(target_modules=["0"]), adapter_name="first")
    views = [ours[0].use_dora, ours[0].lora_bias]
    minilora.add_adapter(ours, "second", LoraConfig(target_modules=["0"]))
    theirs.add_adapter("second", peft_lora_config(target_modules=["0"]))
    peft_layer = theirs.base_model.model[0]
    assert all(view == peft_layer.use_dora == peft_layer.lora_bias == {"first": False, "second": False}
               for view in views)
    minilora.delete_adapter(ours, "first")
    theirs.delete_adapter("first")
    assert all(view == peft_layer.use_dora == {"second": False} and "first" not in view for view in views)


@pytest.mark.parametrize("config_cls", CONFIG_CLASSES)
def test_unknown_file_keys_warn_once_in_peft_s_words(tmp_path, config_cls):
    """A newer PEFT's keys are left out with PEFT's one warning; PEFT's own metadata (peft_version) is silent."""
    import peft

    peft_lora_config(target_modules=["q"], r=4).save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    fields = json.loads(path.read_text())
    assert "peft_version" in fields
    path.write_text(json.dumps({**fields, "foobar": "baz", "spam": 123}))
    words = "Unexpected keyword arguments ['foobar', 'spam'] for class LoraConfig, these are ignored."
    with pytest.warns(UserWarning) as theirs:
        peft.LoraConfig.from_pretrained(tmp_path)
    with pytest.warns(UserWarning) as ours:
        loaded = config_cls.from_pretrained(tmp_path)
    assert len(ours) == len(theirs) == 1
    assert str(ours[0].message).startswith(words) and str(theirs[0].message).startswith(words)
    assert (loaded.r, sorted(loaded.target_modules)) == (4, ["q"])
    assert config_cls.from_json_file(path) == peft.LoraConfig.from_json_file(str(path)) == {**fields, "foobar": "baz",
                                                                                            "spam": 123}
    with pytest.raises(MiniLoraError, match="not valid JSON"):
        (tmp_path / "bad.json").write_text("{")
        config_cls.from_json_file(tmp_path / "bad.json")


@pytest.mark.parametrize("config_cls", CONFIG_CLASSES)
def test_runtime_config_in_a_file_is_left_out_as_peft(tmp_path, config_cls):
    import peft

    peft_lora_config(target_modules=["q"]).save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "runtime_config": {"ephemeral_gpu_offload": True}}))
    words = "The configuration file contains a `runtime_config` key. This is ignored."
    for read in (peft.LoraConfig.from_json_file, config_cls.from_json_file):
        with pytest.warns(UserWarning, match=words):
            assert "runtime_config" not in read(str(path))
    with pytest.warns(UserWarning, match=words):
        assert config_cls.from_pretrained(tmp_path).target_modules in (["q"], {"q"})


def test_compat_config_has_pefts_keys_and_keeps_a_files_peft_version(tmp_path):
    """compat.LoraConfig.to_dict has PEFT's keys (auto_mapping and peft_version included). A config built
    here carries no peft_version (PEFT stamps its own release; minilora is none): saved and read by PEFT,
    only that key differs, PEFT filling in its release as for any file without one. A PEFT-written
    file's peft_version and auto_mapping are kept, and written back by save_pretrained."""
    import peft

    ours = compat.LoraConfig(target_modules=["q"], r=4)
    assert ours.peft_version is None and ours.auto_mapping is None
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftConfig.from_pretrained(tmp_path / "ours")
    assert set(ours.to_dict()) == set(theirs.to_dict())
    assert {key for key in ours.to_dict() if ours.to_dict()[key] != theirs.to_dict()[key]} == {"peft_version"}
    assert theirs.peft_version == peft.__version__

    written = peft.LoraConfig(target_modules=["q"], r=4, auto_mapping={"base_model_class": "MLP"}, peft_version="0.17.0")
    written.save_pretrained(tmp_path / "theirs")
    loaded = compat.LoraConfig.from_pretrained(tmp_path / "theirs")
    assert (loaded.peft_version, loaded.auto_mapping) == ("0.17.0", {"base_model_class": "MLP"})
    loaded.save_pretrained(tmp_path / "again")
    assert peft.PeftConfig.from_pretrained(tmp_path / "again").to_dict() == written.to_dict()
    with pytest.raises(MiniLoraError, match="peft_version must be None or a string"):
        compat.LoraConfig(peft_version=17)
