"""Where PEFT raises or warns, minilora.compat says PEFT's words first (scripts and tests match them),
then its own explanation. Each case runs PEFT 0.21.2 and compat on the same model and config."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from torch import nn

import minilora.compat as compat
from minilora import MiniLoraError


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(6, 5)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(5, 3)
        self.head = nn.Sequential(nn.Linear(3, 3), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lin1(self.relu(self.lin0(x))))


def outcome(api, **fields):
    """(the error's message or None, the warnings' messages) of api.get_peft_model(MLP(), LoraConfig(**fields))."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            api.get_peft_model(MLP(), api.LoraConfig(**fields))
            error = None
        except ValueError as raised:  # (MiniLoraError is a ValueError, as PEFT's errors here)
            error = str(raised)
    return error, [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


@pytest.mark.parametrize("fields", [
    dict(target_modules=["lin0", "lin1", "relu", "head"], exclude_modules=["lin0", "lin1", "relu", "head"]),
    dict(target_modules=["no_such_layer"]),
    dict(target_modules=["no_such_layer"], layers_to_transform=[0], layers_pattern="head"),
    dict(target_modules=["lin0", "no_such_layer"], exclude_modules=["lin0"]),
    dict(target_modules=["head.0"], modules_to_save=["head"]),
    dict(target_modules=".*lin9"),
], ids=["all-excluded", "not-found", "not-found-layers", "excluded-and-unmatched", "only-saved", "regex"])
def test_nothing_targeted_starts_with_pefts_words(fields):
    theirs, _ = outcome(peft, **fields)
    ours, _ = outcome(compat, **fields)
    assert theirs is not None and ours is not None
    # PEFT's message, sets printed in their order: compare up to the set, then the rest after it
    words = theirs.split("{")[0]
    assert ours.startswith(words), (ours, theirs)
    assert ours.startswith(theirs) or "{" in theirs, (ours, theirs)
    with pytest.raises(MiniLoraError):
        compat.get_peft_model(MLP(), compat.LoraConfig(**fields))


@pytest.mark.parametrize("fields,warns", [
    (dict(target_modules=["lin1"], exclude_modules=["no_such_layer"]), True),
    (dict(target_modules=["lin1"], exclude_modules=["no_such_layer"], modules_to_save=["lin0"]), False),
    (dict(target_modules=["lin1"], exclude_modules=["lin0"]), False),  # used
])
def test_unused_exclude_modules_warns_as_peft(fields, warns):
    theirs, their_warnings = outcome(peft, **fields)
    ours, our_warnings = outcome(compat, **fields)
    assert theirs is None and ours is None
    assert our_warnings == their_warnings and bool(their_warnings) == warns


@pytest.mark.parametrize("fields", [
    dict(task_type="invalid-task-type"),
    dict(target_modules=".*foo", layers_to_transform=[0]),
    dict(target_modules=".*foo", layers_pattern=["bar"]),
    dict(target_modules=["foo"], layers_pattern="model.layers"),
    dict(target_modules=["foo"], lora_bias=True, init_lora_weights="gaussian"),
], ids=["task_type", "regex-layers_to_transform", "regex-layers_pattern", "pattern-without-indices", "lora_bias-init"])
def test_config_errors_start_with_pefts_words(fields):
    with pytest.raises(ValueError) as theirs:
        peft.LoraConfig(**fields)
    with pytest.raises(MiniLoraError) as ours:
        compat.LoraConfig(**fields)
    assert str(ours.value).startswith(str(theirs.value).strip()), (str(ours.value), str(theirs.value))


def test_lora_bias_on_a_layer_without_bias_warns_as_peft_with_its_category():
    """PEFT warns with a PeftWarning (a UserWarning); with PEFT imported, compat's warning is one too."""
    caught = {}
    for api in (peft, compat):
        model = nn.Sequential(nn.Linear(4, 4, bias=False))
        with warnings.catch_warnings(record=True) as caught[api]:
            warnings.simplefilter("always")
            api.get_peft_model(model, api.LoraConfig(target_modules=["0"], lora_bias=True))
    theirs, ours = ([(w.category, str(w.message)) for w in caught[api] if "lora_bias" in str(w.message)]
                    for api in (peft, compat))
    assert ours == theirs and len(ours) == 1 and ours[0][0] is peft.PeftWarning


def test_peft_type_keyword_is_accepted_and_set_to_lora_as_in_peft(tmp_path):
    theirs, ours = peft.LoraConfig(peft_type="test"), compat.LoraConfig(peft_type="test")
    assert ours.peft_type == theirs.peft_type == "LORA"
    ours.save_pretrained(tmp_path)
    assert compat.LoraConfig.from_pretrained(tmp_path).peft_type == "LORA"


def test_a_json_without_peft_type_is_refused_as_peft_refuses_it(tmp_path):
    (tmp_path / "adapter_config.json").write_text('{"foo": "bar", "baz": 123}')
    with pytest.raises(TypeError) as theirs:
        peft.LoraConfig.from_pretrained(tmp_path)
    with pytest.raises(MiniLoraError) as ours:
        compat.LoraConfig.from_pretrained(tmp_path)
    assert isinstance(ours.value, TypeError) and str(theirs.value) in str(ours.value)


@pytest.mark.parametrize("own_name", [None, "foobar"])
@pytest.mark.parametrize("given", [None, "custom_name", "foobar"])
def test_get_peft_model_records_the_models_name_and_warns_on_a_rename_as_peft(own_name, given):
    results = []
    for api in (peft, compat):
        model = MLP()
        if own_name is not None:
            model.name_or_path = own_name
        config = api.LoraConfig(target_modules=["lin0"], base_model_name_or_path=given)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            api.get_peft_model(model, config)
        results.append((config.base_model_name_or_path, [str(w.message) for w in caught if "renamed" in str(w.message)]))
    assert results[1] == results[0]
    assert bool(results[0][1]) == (given is not None and given != own_name)


@pytest.mark.parametrize("container", [nn.ModuleDict({"a": nn.Linear(2, 2)}), nn.ModuleList([nn.Linear(2, 2)]),
                                       nn.ParameterDict({"a": nn.Parameter(torch.zeros(2))}),
                                       nn.ParameterList([nn.Parameter(torch.zeros(2))])],
                         ids=["ModuleDict", "ModuleList", "ParameterDict", "ParameterList"])
def test_modules_to_save_on_a_container_is_pefts_type_error(container):
    messages = []
    for api in (peft, compat):
        model = MLP()
        model.box = container
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(TypeError) as raised:
            api.get_peft_model(model, api.LoraConfig(target_modules=["lin0"], modules_to_save=["box"]))
        messages.append(str(raised.value))
    assert isinstance(raised.value, MiniLoraError) and messages[1].startswith(messages[0])
    assert type(model.lin0) is nn.Linear and all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_a_second_adapter_with_bias_is_refused_in_pefts_words():
    messages = []
    for api in (peft, compat):
        model = api.get_peft_model(MLP(), api.LoraConfig(target_modules=["lin0"], bias="all"))
        with pytest.raises(ValueError) as raised:
            model.add_adapter("other", api.LoraConfig(target_modules=["lin0"], bias="lora_only"))
        messages.append(str(raised.value))
        assert list(model.peft_config) == ["default"]
        model.add_adapter("plain", api.LoraConfig(target_modules=["lin0"]))  # bias="none" is fine
    assert messages[1].startswith(messages[0])


@pytest.mark.parametrize("is_trainable", [False, True])
def test_loaded_adapters_config_is_pefts_full_config(tmp_path, is_trainable):
    """After from_pretrained / load_adapter, peft_config[name] holds every PEFT field, as PEFT's does."""
    torch.manual_seed(0)
    peft.get_peft_model(MLP(), peft.LoraConfig(target_modules=["lin0"], modules_to_save=["lin1"], r=2,
                                               revision="v1")).save_pretrained(tmp_path)
    configs = []
    for api in (peft, compat):
        model = api.PeftModel.from_pretrained(MLP(), tmp_path, is_trainable=is_trainable)
        model.load_adapter(tmp_path, "other", is_trainable=is_trainable)
        configs.append({name: config.to_dict() for name, config in model.peft_config.items()})
    for theirs, ours in zip(configs[0].values(), configs[1].values()):
        assert ours == theirs  # peft_version and auto_mapping included: the file's values
        assert ours["inference_mode"] is (not is_trainable) and ours["revision"] == "v1" and "use_dora" in ours


def test_another_peft_methods_config_is_refused_by_name_before_any_change():
    model = MLP()
    with pytest.raises(MiniLoraError, match="IA3 is another PEFT method, and minilora has LoRA only"):
        compat.get_peft_model(model, peft.IA3Config(target_modules=["lin0"], feedforward_modules=[]))
    assert type(model.lin0) is nn.Linear
    with pytest.raises(MiniLoraError, match=r"needs minilora\.compat\.LoraConfig"):  # PEFT's own LoraConfig
        compat.get_peft_model(model, peft.LoraConfig(target_modules=["lin0"]))


@pytest.mark.parametrize("broken", ["default", "other"])
@pytest.mark.parametrize("call", ["merge_and_unload", "merge_adapter"])
def test_a_broken_adapter_is_refused_at_safe_merge_in_pefts_words(broken, call):
    """PEFT's model tests match "NaNs detected in the merged weights. The adapter default seems to be broken"
    (a ValueError). With two adapters folded in one after the other, both name the one that breaks W0.
    PEFT raises at lin1 after merging lin0; minilora checks every layer first and changes nothing."""
    messages, lin0_merged = [], []
    for api in (peft, compat):
        torch.manual_seed(0)
        model = api.get_peft_model(MLP(), api.LoraConfig(target_modules=["lin0", "lin1"], init_lora_weights=False))
        model.add_adapter("other", api.LoraConfig(target_modules=["lin0", "lin1"], init_lora_weights=False))
        with torch.no_grad():
            model.base_model.model.lin1.lora_A[broken].weight[0, 0] = torch.nan
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(ValueError) as raised:
            if call == "merge_and_unload":
                model.merge_and_unload(safe_merge=True, adapter_names=["default", "other"])
            else:
                model.merge_adapter(adapter_names=["default", "other"], safe_merge=True)
        messages.append(str(raised.value))
        lin0_merged.append(getattr(model.base_model.model.lin0, "merged", "unloaded"))
    assert messages[0] == f"NaNs detected in the merged weights. The adapter {broken} seems to be broken"
    assert isinstance(raised.value, MiniLoraError) and messages[1].startswith(messages[0])
    assert messages[1].endswith("Nothing was merged.")
    # PEFT's model is half changed by then (merge_adapter: lin0 merged; merge_and_unload: lin0 unloaded) ...
    assert lin0_merged[0] == (True if call == "merge_adapter" else "unloaded")
    # ... minilora's is as it was
    assert lin0_merged[1] is False and model.base_model.model.lin1.merged_adapters == []
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():  # (lin1's broken A holds a NaN: compared where, and elsewhere bitwise)
        assert torch.equal(after[key].isnan(), value.isnan()) and torch.equal(after[key].nan_to_num(), value.nan_to_num())
