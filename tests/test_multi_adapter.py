"""Several adapters per model, against PEFT as the oracle: every call is made on a PEFT model and on
a minilora.compat model built from the same base and seed, and the results compared (bitwise in
float32 on the CPU, where minilora does PEFT's operations in PEFT's order).

The models are PEFT's own test shapes (test_custom_models.py): an MLP with nn.Linear layers and a
GPT-2 style Conv1D layer, small enough to run every case in well under a second.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import warnings

import peft
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import minilora
from conftest import record_model
from minilora import MiniLoraError, compat

PREFIX = "base_model.model."


class MLP(nn.Module):
    """Linear -> ReLU -> Linear -> Conv1D (GPT-2's transposed layout)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(20, 6)
        self.conv = Conv1D(4, 6)  # nf=4 out, nx=6 in: weight (6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.lin1(self.relu(self.lin0(x))))


def base() -> MLP:
    torch.manual_seed(0)
    return MLP()


OTHER = dict(r=2, lora_alpha=5, target_modules=["lin0", "lin1", "conv"], init_lora_weights=False)


def pair(seed: int = 1, second: dict = OTHER) -> tuple[nn.Module, nn.Module]:
    """(PEFT model, minilora.compat model): "default" on lin0, then "other" (``second``) added, same seeds."""
    models = []
    for lib in (peft, compat):
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PEFT's fan_in_fan_out notice for Conv1D
            model = lib.get_peft_model(base(), lib.LoraConfig(r=4, target_modules=["lin0"], init_lora_weights=False))
            model.add_adapter("other", lib.LoraConfig(**second))
        models.append(model)
    return models[0], models[1]


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict by minilora's keys (PEFT's without its wrapper's prefix). minilora's record of which
    adapters are merged (``<layer>.lora_merged.<adapter>``, layer.py) is left out: PEFT has none."""
    return {key.removeprefix(PREFIX): value for key, value in model.state_dict().items() if ".lora_merged." not in key}


def trainable(model: nn.Module) -> list[str]:
    return sorted(name.removeprefix(PREFIX) for name, param in model.named_parameters() if param.requires_grad)


def assert_same_state(theirs: nn.Module, ours: nn.Module) -> None:
    theirs_state, ours_state = state(theirs), state(ours)
    assert sorted(theirs_state) == sorted(ours_state)
    different = [key for key in ours_state if not torch.equal(theirs_state[key], ours_state[key])]
    assert not different, different
    assert trainable(theirs) == trainable(ours)


X = torch.randn(5, 10, generator=torch.Generator().manual_seed(3))


# ------------------------------------------------------------------------------------------------
# add_adapter / set_adapter / active adapters
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("init", [True, False, "gaussian"])
def test_added_adapter_has_peft_weights_and_trainable_names(init):
    """Same seed, same A and B for every adapter, in old and new layers; only 'default' trains."""
    theirs, ours = pair(second={**OTHER, "init_lora_weights": init})
    assert_same_state(theirs, ours)
    assert trainable(ours) == ["lin0.lora_A.default.weight", "lin0.lora_B.default.weight"]
    assert ours.peft_config.keys() == theirs.peft_config.keys() == {"default", "other"}


@pytest.mark.parametrize("names", ["other", ["default", "other"], ["other", "default"], "default"])
def test_set_adapter_gives_peft_outputs_gradients_and_trainable_names(names):
    theirs, ours = pair()
    (theirs.base_model if isinstance(names, list) else theirs).set_adapter(names)
    (ours.base_model if isinstance(names, list) else ours).set_adapter(names)
    assert trainable(theirs) == trainable(ours)
    assert theirs.active_adapters == ours.active_adapters == ([names] if isinstance(names, str) else names)
    theirs_out, ours_out = theirs(X), ours(X)
    assert torch.equal(theirs_out, ours_out)
    theirs_out.square().sum().backward()
    ours_out.square().sum().backward()
    theirs_grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    for name, param in ours.named_parameters():
        if param.requires_grad:
            assert torch.equal(param.grad, theirs_grads[name]), name


def test_native_api_names_the_same_state():
    model = base()
    torch.manual_seed(1)
    minilora.inject(model, minilora.LoraConfig(r=4, target_modules=["lin0"]))
    minilora.add_adapter(model, "other", minilora.LoraConfig(**OTHER))
    assert minilora.adapter_names(model) == ["default", "other"]
    assert minilora.active_adapters(model) == ["default"]
    minilora.set_adapter(model, ["other", "default"])
    assert minilora.active_adapters(model) == ["other", "default"]
    expected = model.lin0.base_layer(X)
    for name in ("other", "default"):
        expected = expected + model.lin0.lora_update(X, name)  # in the active order
    assert torch.equal(model.lin0(X), expected)


def test_add_and_set_adapter_errors_change_nothing():
    _, ours = pair()
    check = record_model(ours)
    with pytest.raises(MiniLoraError, match="Adapter with name 'other' already exists"):
        ours.add_adapter("other", compat.LoraConfig(r=2, target_modules=["lin0"]))
    with pytest.raises(MiniLoraError, match="no adapter named 'nope'"):
        ours.base_model.set_adapter(["default", "nope"])
    with pytest.raises(MiniLoraError, match="bias='none'"):
        ours.add_adapter("third", compat.LoraConfig(r=2, target_modules=["lin0"], bias="all"))
    with pytest.raises(MiniLoraError, match="matches no module"):
        ours.add_adapter("third", compat.LoraConfig(r=2, target_modules=["nothing"]))
    with pytest.raises(MiniLoraError, match="without dots"):
        ours.add_adapter("a.b", compat.LoraConfig(r=2, target_modules=["lin0"]))
    check()


# ------------------------------------------------------------------------------------------------
# delete_adapter
# ------------------------------------------------------------------------------------------------
def test_delete_the_active_adapter_as_peft():
    theirs, ours = pair()
    with pytest.warns(UserWarning, match="Adapter default was active which is now deleted. Setting active adapter "
                                         "to other."):
        theirs.delete_adapter("default")
    with pytest.warns(UserWarning, match="Adapter default was active which is now deleted. Setting active adapter "
                                         "to other."):
        ours.delete_adapter("default")
    assert_same_state(theirs, ours)
    assert theirs.active_adapters == ours.active_adapters == ["other"]
    assert list(ours.peft_config) == list(theirs.peft_config) == ["other"]
    assert torch.equal(theirs(X), ours(X))


def test_delete_refuses_a_merged_or_unknown_adapter():
    _, ours = pair()
    ours.merge_adapter()
    check = record_model(ours)
    with pytest.raises(MiniLoraError, match="while it is merged"):
        ours.delete_adapter("default")
    with pytest.raises(MiniLoraError, match="Adapter nope does not exist"):
        ours.delete_adapter("nope")
    check()


# ------------------------------------------------------------------------------------------------
# merge_adapter / unmerge_adapter, enable / disable
# ------------------------------------------------------------------------------------------------
def test_merge_and_unmerge_adapter_as_peft():
    theirs, ours = pair()
    for model in (theirs, ours):
        model.merge_adapter()
    assert_same_state(theirs, ours)
    assert torch.equal(theirs(X), ours(X))
    for model in (theirs, ours):
        with pytest.warns(UserWarning, match="Already following adapters were merged default. You are now "
                                             "additionally merging other."):
            model.merge_adapter(["default", "other"])
    assert_same_state(theirs, ours)
    for model in (theirs, ours):
        with pytest.warns(UserWarning, match="All adapters are already merged, nothing to do."):
            model.merge_adapter(["other"])
    assert [s.merged_adapters for s in theirs.get_layer_status()] == \
        [s.merged_adapters for s in ours.get_layer_status()]
    for model in (theirs, ours):
        model.unmerge_adapter()
        with pytest.warns(UserWarning, match="Already unmerged. Nothing to do."):
            model.unmerge_adapter()
    assert_same_state(theirs, ours)


def test_disable_and_enable_adapter_layers_as_peft():
    theirs, ours = pair()
    for model in (theirs, ours):
        model.disable_adapter_layers()
    assert trainable(theirs) == trainable(ours) == []
    assert torch.equal(theirs(X), ours(X))
    assert theirs.get_model_status().enabled is ours.get_model_status().enabled is False
    for model in (theirs, ours):
        model.enable_adapter_layers()
    assert trainable(theirs) == trainable(ours)
    assert torch.equal(theirs(X), ours(X))


def test_disable_adapter_on_a_merged_model_gives_base_outputs_as_peft():
    """PEFT unmerges on the fly inside ``disable_adapter``; the model is unmerged afterwards."""
    theirs, ours = pair()
    base_out = base()(X)
    inside = []
    for model in (theirs, ours):
        model.merge_adapter()
        with model.disable_adapter():
            inside.append(model(X))
    assert torch.equal(inside[0], inside[1])
    assert (inside[1] - base_out).abs().max() <= 1e-6  # W0 + dW - dW: float32 rounding of W0 only
    assert [s.merged_adapters for s in theirs.get_layer_status()] == \
        [s.merged_adapters for s in ours.get_layer_status()] == [[], [], []]
    assert torch.equal(theirs(X), ours(X))
    assert trainable(theirs) == trainable(ours)


# ------------------------------------------------------------------------------------------------
# get_layer_status / get_model_status
# ------------------------------------------------------------------------------------------------
def test_layer_and_model_status_as_peft():
    theirs, ours = pair()
    theirs.base_model.set_adapter(["other", "default"])
    ours.base_model.set_adapter(["other", "default"])
    theirs.merge_adapter(["default"])
    ours.merge_adapter(["default"])
    assert [dataclasses.asdict(s) for s in theirs.get_layer_status()] == \
        [dataclasses.asdict(s) for s in ours.get_layer_status()]
    assert dataclasses.asdict(theirs.get_model_status()) == dataclasses.asdict(ours.get_model_status())


# ------------------------------------------------------------------------------------------------
# Files with several adapters, both ways
# ------------------------------------------------------------------------------------------------
def outputs_per_adapter(model: nn.Module) -> dict[str, torch.Tensor]:
    results = {}
    for name in ("default", "other"):
        model.set_adapter(name)
        with torch.no_grad():
            results[name] = model(X)
    return results


def test_save_pretrained_layout_and_files_both_ways(tmp_path):
    theirs, ours = pair()
    theirs.save_pretrained(tmp_path / "peft")
    ours.save_pretrained(tmp_path / "mini")
    for directory in ("peft", "mini"):
        files = sorted(p.relative_to(tmp_path / directory).as_posix() for p in (tmp_path / directory).rglob("*"))
        assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors", "other",
                         "other/adapter_config.json", "other/adapter_model.safetensors"], directory
    readme = (tmp_path / "mini" / "README.md").read_text()
    assert "library_name: peft" in readme and "- lora" in readme
    expected = outputs_per_adapter(ours)

    for source, lib in (("mini", peft), ("peft", compat)):  # each library reads the other's files
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = lib.PeftModel.from_pretrained(base(), tmp_path / source)
            loaded.load_adapter(tmp_path / source / "other", adapter_name="other")
        assert sorted(loaded.peft_config) == ["default", "other"]
        got = outputs_per_adapter(loaded)
        assert all(torch.equal(got[name], expected[name]) for name in expected), source


def test_load_adapter_into_a_model_with_others_as_peft(tmp_path):
    """A loaded adapter is added inactive, frozen (is_trainable=False) and the model goes to eval."""
    theirs, ours = pair()
    ours.save_pretrained(tmp_path, selected_adapters=["other"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "other"]
    for model in (theirs, ours):
        model.train()
        model.load_adapter(tmp_path / "other", adapter_name="loaded")
    assert_same_state(theirs, ours)
    assert not theirs.training and not ours.training
    assert theirs.active_adapters == ours.active_adapters == ["default"]
    for model in (theirs, ours):
        model.set_adapter("loaded")
    assert torch.equal(theirs(X), ours(X))
    assert torch.equal(ours(X), ours.set_adapter("other") or ours(X))
    config = json.loads((tmp_path / "other" / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["lora_alpha"] == 5


def test_save_pretrained_refuses_unknown_selected_adapters(tmp_path):
    _, ours = pair()
    with pytest.raises(MiniLoraError, match="invalid `selected_adapters`"):
        ours.save_pretrained(tmp_path / "out", selected_adapters=["nope"])
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------
# add_weighted_adapter
# ------------------------------------------------------------------------------------------------
SAME_RANK = dict(r=4, lora_alpha=7, target_modules=["lin0", "lin1"], init_lora_weights=False)


def weighted_pair(combination: str, second: dict = OTHER, **options) -> tuple[nn.Module, nn.Module]:
    """(PEFT, minilora) after add_weighted_adapter(... "mix"), with "mix" active; the random numbers
    drawn after the call must be the same too (the new adapter is built from the RNG, then filled)."""
    theirs, ours = pair(second=second)
    after = []
    for model in (theirs, ours):
        torch.manual_seed(5)
        model.add_weighted_adapter(["default", "other"], [0.7, -1.3], "mix", combination_type=combination, **options)
        after.append(torch.rand(3))
        model.set_adapter("mix")
    assert torch.equal(after[0], after[1]), "add_weighted_adapter drew other random numbers than PEFT's"
    return theirs, ours


@pytest.mark.parametrize("combination, second", [("cat", OTHER), ("linear", SAME_RANK)])
def test_weighted_adapter_cat_and_linear_are_peft_bitwise(combination, second):
    theirs, ours = weighted_pair(combination, second)
    assert_same_state(theirs, ours)
    assert torch.equal(theirs(X), ours(X))
    assert dataclasses.asdict(theirs.get_model_status()) == dataclasses.asdict(ours.get_model_status())


def test_weighted_cat_is_the_weighted_sum_of_updates():
    """cat is exact: dW_mix = 0.7 dW_default - 1.3 dW_other, checked in float64 from the parts."""
    _, ours = weighted_pair("cat")
    for name in ("lin0", "lin1", "conv"):
        layer = getattr(ours, name)
        expected = sum(w * layer.delta_weight(a).double() for a, w in (("default", 0.7), ("other", -1.3))
                       if a in layer.lora_A)
        got = layer.delta_weight("mix").double()
        assert (got - expected).abs().max() <= 1e-6 * expected.abs().max(), name


# SVD tolerance. PEFT and minilora run the same LAPACK routine on the same float32 matrix, but the
# truncated factors are only defined up to the sign of each singular pair, and the dW they rebuild
# (B A = U_k S_k V_k^T) is exact only up to float32 rounding of a backward-stable SVD:
# |error| <~ c * eps * ||dW|| with eps = 1.2e-7 and c a small multiple of the matrix size (<= 20 here).
# 1e-5 relative to max |dW| leaves a 4x margin over 20 * eps and is far below a real error (a wrong
# weight, scaling or transpose moves dW by O(1) relative).
SVD_RTOL = 1e-5


@pytest.mark.parametrize("svd_rank", [None, 4, 1])
def test_weighted_adapter_svd_within_the_stated_tolerance(svd_rank):
    theirs, ours = weighted_pair("svd", svd_rank=svd_rank)
    assert sorted(state(theirs)) == sorted(state(ours)) and trainable(theirs) == trainable(ours)
    for name in ("lin0", "lin1", "conv"):
        ours_delta = getattr(ours, name).delta_weight("mix")
        theirs_delta = getattr(theirs.base_model.model, name).get_delta_weight("mix")
        assert (ours_delta - theirs_delta).abs().max() <= SVD_RTOL * theirs_delta.abs().max(), name
    out_theirs, out_ours = theirs(X), ours(X)
    assert (out_theirs - out_ours).abs().max() <= SVD_RTOL * out_theirs.abs().max()


def test_weighted_adapter_svd_is_exact_when_the_rank_suffices():
    """svd_rank >= sum of ranks: B A is the weighted sum itself (independent float64 reference)."""
    _, ours = weighted_pair("svd", second=dict(OTHER, target_modules=["lin0"]), svd_rank=6)  # 4 + 2 <= 6
    layer = ours.lin0
    expected = 0.7 * layer.delta_weight("default").double() - 1.3 * layer.delta_weight("other").double()
    assert (layer.delta_weight("mix").double() - expected).abs().max() <= SVD_RTOL * expected.abs().max()


def test_weighted_adapter_errors():
    _, ours = pair()
    check = record_model(ours)
    with pytest.raises(MiniLoraError, match="same r value"):
        ours.add_weighted_adapter(["default", "other"], [1.0, 1.0], "mix", combination_type="linear")
    with pytest.raises(MiniLoraError, match=r"combination_type='ties': minilora has .* not in minilora"):
        ours.add_weighted_adapter(["default", "other"], [1.0, 1.0], "mix", combination_type="ties")
    with pytest.raises(MiniLoraError, match="no adapter named 'nope'"):
        ours.add_weighted_adapter(["default", "nope"], [1.0, 1.0], "mix")
    # conv is (in 6, out 4): a rank-6 SVD of its dW has 4 singular triplets. PEFT builds A (6, 6) and
    # B (4, 4) there, and the model fails at its next forward; minilora refuses up front.
    with pytest.raises(MiniLoraError, match="svd_rank=6 .* 'conv'"):
        ours.add_weighted_adapter(["default", "other"], [1.0, 1.0], "mix", svd_rank=6)
    check()


# ------------------------------------------------------------------------------------------------
# Mixed batches: one adapter per row
# ------------------------------------------------------------------------------------------------
ROWS = ["other", "__base__", "default", "other", "default"]


def test_mixed_batch_is_peft_bitwise_and_each_row_is_its_adapter_alone():
    theirs, ours = pair()
    for model in (theirs, ours):
        model.eval()
    with torch.no_grad():
        expected = theirs(X, adapter_names=ROWS)
        got = ours(X, adapter_names=ROWS)
        assert torch.equal(got, expected)
        with minilora.mixed_batch(ours, ROWS):  # the native form
            assert torch.equal(ours(X), expected)
        for row, name in enumerate(ROWS):  # independent: the row through its adapter alone
            if name == "__base__":
                alone = base()(X[row:row + 1])
            else:
                ours.set_adapter(name)
                alone = ours(X[row:row + 1])
            assert (got[row] - alone[0]).abs().max() <= 1e-6, row
    assert all(layer.forward_override is None for _, layer in minilora.lora_layers(ours))  # hooks left


def test_mixed_batch_on_gpt2_is_peft_bitwise(tiny_gpt2):
    config = dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], init_lora_weights=False)
    models = []
    for lib in (peft, compat):
        torch.manual_seed(2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = lib.get_peft_model(copy.deepcopy(tiny_gpt2), lib.LoraConfig(**config))
            model.add_adapter("other", lib.LoraConfig(**{**config, "r": 2}))
        models.append(model.eval())
    tokens = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(0))
    names = ["other", "default", "__base__"]
    with torch.no_grad():
        assert torch.equal(models[0](tokens, adapter_names=names).logits, models[1](tokens, adapter_names=names).logits)


def test_mixed_batch_errors_as_peft():
    _, ours = pair()
    with pytest.raises(MiniLoraError, match="training mode"):
        ours(X, adapter_names=ROWS)
    ours.eval()
    with pytest.raises(MiniLoraError, match="non-existing adapter"):
        ours(X, adapter_names=["nope"] * 5)
    with pytest.raises(MiniLoraError, match="Length of `adapter_names`"):
        ours(X, adapter_names=ROWS[:2])
    ours.merge_adapter()
    with pytest.raises(MiniLoraError, match="merged adapters"):
        ours(X, adapter_names=ROWS)
    ours.unmerge_adapter()
    assert all(layer.forward_override is None for _, layer in minilora.lora_layers(ours))


@pytest.mark.parametrize("off", [None, "disable_adapter_layers", "disable_adapter"])
def test_a_mixed_batch_on_a_layer_that_flattens_its_input_is_refused_as_peft(off):
    """OPT's fc1 / fc2 see (batch * seq, hidden) rows: PEFT's layer checks len(x) against adapter_names
    before it looks at whether the layer is switched off, so with base_model.disable_adapter_layers() the
    mixed batch fails as with the adapters on (found by parity.differential_sequences --seed 707, #69;
    minilora ran it). Inside PeftModel.disable_adapter() PEFT passes no names to the layers: both run."""
    from parity.architectures import ARCHITECTURES

    ids = torch.randint(3, 100, (2, 5), generator=torch.Generator().manual_seed(1))
    outcomes = []
    for lib in (peft, compat):
        torch.manual_seed(0)
        model = lib.get_peft_model(ARCHITECTURES["opt"].build(), lib.LoraConfig(r=4, target_modules=["fc1"]))
        model.eval()
        if off == "disable_adapter_layers":
            model.base_model.disable_adapter_layers()
        with torch.no_grad(), model.disable_adapter() if off == "disable_adapter" else contextlib.nullcontext():
            try:
                outcomes.append(model(input_ids=ids, adapter_names=["default", "__base__"]).logits)
            except ValueError as error:
                outcomes.append(error)
    theirs, ours = outcomes
    if off == "disable_adapter":
        assert torch.equal(ours, theirs)
    else:
        assert str(theirs).startswith("Length of `adapter_names` should be the same as the number of inputs")
        assert isinstance(ours, MiniLoraError) and str(ours) == str(theirs)


def test_generate_with_adapter_names_is_peft_s(tiny_gpt2):
    """model.generate(..., adapter_names=[...]): greedy tokens equal PEFT's, with beams too."""
    config = dict(r=4, target_modules=["c_attn"], init_lora_weights=False)
    results = []
    for lib in (peft, compat):
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = lib.get_peft_model(copy.deepcopy(tiny_gpt2), lib.LoraConfig(**config))
            model.add_adapter("other", lib.LoraConfig(**{**config, "r": 2}))
            model.eval()
            ids = torch.randint(0, 50, (3, 4), generator=torch.Generator().manual_seed(1))
            names = ["other", "__base__", "default"]
            results.append([model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                                           do_sample=False, num_beams=beams, adapter_names=names, pad_token_id=0)
                            for beams in (1, 2)])
    assert all(torch.equal(ours, theirs) for ours, theirs in zip(results[1], results[0]))


@pytest.mark.parametrize("architecture", ["t5", "bart"])
def test_generate_with_adapter_names_on_an_encoder_decoder_is_peft_s(architecture):
    """Beam search on T5 / BART with adapter_names: the encoder sees each input once, the decoder once per
    beam (PEFT gives the encoder the names as passed); tokens equal PEFT's. Generate takes keyword
    arguments only, as PEFT's PeftModelForSeq2SeqLM: a positional input_ids is a TypeError in both."""
    from parity.architectures import ARCHITECTURES

    config = dict(r=4, target_modules=["q", "v"] if architecture == "t5" else ["q_proj", "v_proj"],
                  init_lora_weights=False, task_type="SEQ_2_SEQ_LM")
    ids = torch.randint(3, 100, (3, 5), generator=torch.Generator().manual_seed(1))
    results = []
    for lib in (peft, compat):
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = lib.get_peft_model(ARCHITECTURES[architecture].build(), lib.LoraConfig(**config))
            model.add_adapter("other", lib.LoraConfig(**{**config, "r": 2}))
            model.eval()
            with pytest.raises(TypeError):
                model.generate(ids)
            results.append([model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, num_beams=beams,
                                           adapter_names=["other", "__base__", "default"]) for beams in (1, 3)])
    assert all(torch.equal(ours, theirs) for ours, theirs in zip(results[1], results[0]))


def test_fused_path_adds_every_active_adapter():
    """The fused forward path (fused.py) with two active adapters equals the reference path."""
    model = base()
    minilora.inject(model, minilora.LoraConfig(r=4, target_modules=["lin0", "conv"], init_lora_weights=False))
    minilora.add_adapter(model, "other", minilora.LoraConfig(**OTHER))
    minilora.set_adapter(model, ["default", "other"])
    with torch.no_grad():
        reference = model(X)
        minilora.set_forward_path(model, "fused")
        fused = model(X)
        minilora.set_adapter(model, "other")  # one active adapter: the concatenated weight, built for it
        fused_other = model(X)
        minilora.set_forward_path(model, "reference")
        reference_other = model(X)
    assert (fused - reference).abs().max() <= 1e-5 * reference.abs().max()
    assert (fused_other - reference_other).abs().max() <= 1e-5 * reference_other.abs().max()
