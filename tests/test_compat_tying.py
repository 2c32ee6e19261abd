"""ensure_weight_tying (compat_tying.py) against PEFT: the same warnings on the same models, the same
injected adapter where PEFT does not tie, and a MiniLoraError, before any change, where it would."""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
from torch import nn

import minilora
import minilora.compat as compat
from minilora import MiniLoraError
from minilora.compat_tying import tied_module_names


class _Config:
    def __init__(self, tie: bool) -> None:
        self.tie_word_embeddings = tie

    def to_dict(self) -> dict:
        return {"tie_word_embeddings": self.tie_word_embeddings}


class _Body(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(12, 8)
        self.linear = nn.Linear(8, 8)


def tiny_lm(tied: bool = True, config_says_tied: bool | None = None, dict_keys: bool = False) -> nn.Module:
    """A causal-LM shape: model.embed_tokens, model.linear, lm_head (sharing the embedding's weight when tied)."""
    class TinyLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.model = _Body()
            self.lm_head = nn.Linear(8, 12, bias=False)
            self.config = _Config(tied if config_says_tied is None else config_says_tied)
            if tied:
                self.lm_head.weight = self.model.embed_tokens.weight
                self._tied_weights_keys = ({"lm_head.weight": "model.embed_tokens.weight"} if dict_keys
                                           else ["lm_head.weight"])

        def get_input_embeddings(self) -> nn.Module:
            return self.model.embed_tokens

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.lm_head(self.model.linear(self.model.embed_tokens(ids)))

    return TinyLM()


def run(api, model: nn.Module, **fields):
    """get_peft_model with ``api`` (peft or minilora.compat): (the wrapped model or the error, the warnings' texts)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            torch.manual_seed(1)
            result = api.get_peft_model(model, api.LoraConfig(**fields))
        except (ValueError, MiniLoraError) as error:
            result = error
    return result, [str(w.message) for w in caught if "tie" in str(w.message)]


@pytest.mark.parametrize("dict_keys", [False, True])
def test_tied_module_names_as_peft(dict_keys):
    from peft.utils.other import _get_module_names_tied_with_embedding

    for model in (tiny_lm(dict_keys=dict_keys), tiny_lm(tied=False), tiny_lm(config_says_tied=False)):
        assert tied_module_names(model) == _get_module_names_tied_with_embedding(model)
    assert tied_module_names(tiny_lm(dict_keys=dict_keys)) == ["lm_head"]


CASES = [  # (model options, config fields): PEFT injects without tying, and warns (or not)
    ({}, dict(target_modules=["linear"], ensure_weight_tying=True)),                       # nothing tied is adapted
    ({}, dict(target_modules=["linear"], modules_to_save=["lm_head"])),                    # unties, with a warning
    ({}, dict(target_modules=["linear", "lm_head"])),                                      # the same, with LoRA
    ({"tied": False}, dict(target_modules=["linear", "lm_head"], ensure_weight_tying=True)),  # nothing is tied
    ({"config_says_tied": False}, dict(target_modules=["linear"], modules_to_save=["embed_tokens"],
                                       ensure_weight_tying=True)),                          # config unties
    ({"dict_keys": True}, dict(target_modules="all-linear", ensure_weight_tying=True)),      # lm_head not in all-linear
]


@pytest.mark.parametrize("options,fields", CASES)
def test_same_warnings_and_same_adapter_as_peft(options, fields):
    theirs, their_warnings = run(peft, tiny_lm(**options), **fields)
    ours, our_warnings = run(compat, tiny_lm(**options), **fields)
    assert not isinstance(theirs, Exception) and not isinstance(ours, Exception), (theirs, ours)
    # every case here warns in PEFT, and minilora gives the same words (LoRA on a tied layer also gets
    # minilora's own warning about merging it, inject.py)
    assert their_warnings and [w for w in our_warnings if "merged outputs equal" not in w] == their_warnings
    their_state, our_state = theirs.state_dict(), ours.state_dict()
    assert sorted(our_state) == sorted(their_state)
    for key in their_state:
        assert torch.equal(our_state[key], their_state[key]), key
    assert ({n for n, p in ours.named_parameters() if p.requires_grad}
            == {n for n, p in theirs.named_parameters() if p.requires_grad})
    ids = torch.tensor([[1, 5, 7]])
    assert torch.equal(ours(ids), theirs(ids))


@pytest.mark.parametrize("fields,names", [
    (dict(target_modules=["linear", "lm_head"]), "Embedding"),           # PEFT: LoRA on embed_tokens, shared
    (dict(target_modules=".*lm_head"), "Embedding"),
    (dict(target_modules=["linear"], modules_to_save=["lm_head"]), "modules_to_save"),  # PEFT: one shared copy
])
def test_tying_minilora_cannot_do_is_refused_before_any_change(fields, names):
    model = tiny_lm()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    theirs, _ = run(peft, tiny_lm(), ensure_weight_tying=True, **fields)
    assert not isinstance(theirs, Exception)  # PEFT ties them; minilora says it cannot
    with pytest.raises(MiniLoraError, match=names):
        compat.get_peft_model(model, compat.LoraConfig(ensure_weight_tying=True, **fields))
    assert {k: v for k, v in model.state_dict().items()}.keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert isinstance(model.lm_head, nn.Linear) and isinstance(model.model.linear, nn.Linear)


def test_ensure_weight_tying_must_be_a_bool():
    with pytest.raises(MiniLoraError, match="ensure_weight_tying must be True or False"):
        compat.LoraConfig(target_modules=["linear"], ensure_weight_tying="yes")


def test_modules_to_save_wrapper_is_pefts_name_for_isinstance():
    model = compat.get_peft_model(tiny_lm(tied=False), compat.LoraConfig(target_modules=["linear"],
                                                                         modules_to_save=["lm_head"]))
    assert isinstance(model.base_model.model.lm_head, compat.ModulesToSaveWrapper)


def test_an_invalid_regex_target_still_gets_the_targets_message():
    model = tiny_lm()
    with pytest.raises(MiniLoraError, match="not a valid one"):
        compat.get_peft_model(model, compat.LoraConfig(target_modules="(", ensure_weight_tying=True))
    assert isinstance(model.lm_head, nn.Linear) and type(model.model.linear) is nn.Linear


def load(loader) -> tuple:
    """(the loaded model or the error, the tying warnings' texts) of ``loader()``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = loader()
        except (ValueError, MiniLoraError) as error:
            result = error
    return result, [str(w.message) for w in caught if "tie" in str(w.message)]


@pytest.mark.parametrize("options,fields", CASES[:-1])
def test_native_load_adapter_honours_a_saved_ensure_weight_tying_as_peft(options, fields, tmp_path):
    """An adapter PEFT saved (adapter_config.json has ensure_weight_tying), loaded by PEFT's
    from_pretrained and by minilora.load_adapter: the same warnings, the same outputs. (CASES[-1]
    saves lm_head among its targets: see the next test.)"""
    saved, _ = run(peft, tiny_lm(**options), **fields)
    saved.save_pretrained(tmp_path, save_embedding_layers=False)  # (the tied weights are the base model's)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["ensure_weight_tying"] is \
        fields.get("ensure_weight_tying", False)
    theirs, their_warnings = load(lambda: peft.PeftModel.from_pretrained(tiny_lm(**options), tmp_path))
    ours, our_warnings = load(lambda: minilora.load_adapter(tiny_lm(**options), tmp_path))
    assert not isinstance(theirs, Exception) and not isinstance(ours, Exception), (theirs, ours)
    assert their_warnings and [w for w in our_warnings if "merged outputs equal" not in w] == their_warnings
    ids = torch.tensor([[1, 5, 7]])
    with torch.no_grad():
        assert torch.equal(ours(ids), theirs(ids))


@pytest.mark.parametrize("options,fields,names", [
    ({}, dict(target_modules=["linear", "lm_head"]), "Embedding"),
    ({}, dict(target_modules=["linear"], modules_to_save=["lm_head"]), "modules_to_save"),
    # PEFT's "all-linear" takes lm_head here (after warning that nothing tied is adapted) and saves
    # ["lm_head", "model.linear"]; its from_pretrained then puts LoRA on embed_tokens instead, with a
    # "missing adapter keys" warning
    ({"dict_keys": True}, dict(target_modules="all-linear"), "Embedding"),
])
def test_native_load_adapter_refuses_pefts_tied_adapters_before_any_change(options, fields, names, tmp_path,
                                                                           unchanged):
    """An adapter PEFT saved with ensure_weight_tying=True and a tied layer in it (PEFT loads it as LoRA
    on the embedding, or one shared trained copy): minilora.load_adapter says it cannot, as compat's
    get_peft_model does, and leaves the model alone."""
    saved, _ = run(peft, tiny_lm(**options), ensure_weight_tying=True, **fields)
    saved.save_pretrained(tmp_path, save_embedding_layers=False)
    model = tiny_lm(**options)
    check = unchanged(model)
    with pytest.raises(MiniLoraError, match=names):
        minilora.load_adapter(model, tmp_path)
    check()


class _HeadModel(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.lin0, self.lm_head, self.config = nn.Linear(6, 8), nn.Linear(8, 3), config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(torch.relu(self.lin0(x)))


@pytest.mark.parametrize("tie", [True, False])
def test_the_tied_target_warning_before_a_merge_reads_a_plain_dict_config_as_peft(tie):
    """PEFT's _check_merge_allowed reads the config as its get_model_config does: a plain dict config (a custom
    model's) with tie_word_embeddings=True and a LoRA layer named lm_head gives its warning before merge_adapter.
    minilora read only configs with to_dict, so it said nothing there."""
    said = []
    for lib in (peft, compat):
        torch.manual_seed(0)
        model = lib.get_peft_model(_HeadModel({"tie_word_embeddings": tie}), lib.LoraConfig(target_modules=["lm_head"]))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.merge_adapter()
        said.append([str(w.message) for w in caught if "tie_word_embeddings=True" in str(w.message)])
    assert said[0] == said[1] and len(said[0]) == int(tie), said
