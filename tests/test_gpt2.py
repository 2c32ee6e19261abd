"""GPT-2 facts: what LoRA trains, counted by minilora and by PEFT; freezing; taking LoRA out again.

Counts depend only on shapes, so most tests build GPT-2 small on the meta device (no memory, no
init: milliseconds) and ask PEFT for its numbers on an identical model. Outputs need real numbers:
those tests use the embedded GPT-2 small or a toy-size GPT-2 (same Conv1D layout).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

import minilora
from conftest import make_tiny_gpt2
from minilora import LoraConfig
from parity.twins import peft_config, peft_key

GPT2_SMALL_PARAMETERS = 124_439_808  # the pretrained "gpt2" checkpoint's count (wte and lm_head tied)
HEADLINE = "trainable params: 294,912 || all params: 124,734,720 || trainable%: 0.2364"  # PEFT's line
N_LAYER, N_EMBD = 12, 768


def meta_gpt2() -> nn.Module:
    """GPT-2 small with every tensor on the meta device: the shapes without the numbers."""
    with torch.device("meta"):
        return GPT2LMHeadModel(GPT2Config())


def peft_model(config: LoraConfig) -> nn.Module:
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's fan_in_fan_out notice for Conv1D
        return peft.get_peft_model(meta_gpt2(), peft_config(config))


def trainable_names(model: nn.Module) -> list[str]:
    return [name for name, param in model.named_parameters() if param.requires_grad]


# ------------------------------------------------------------------------------------------------
# The headline numbers
# ------------------------------------------------------------------------------------------------
def test_embedded_default_is_gpt2_small(_gpt2_pristine):
    model = _gpt2_pristine
    assert isinstance(model, GPT2LMHeadModel) and not model.training
    assert minilora.count_parameters(model) == (GPT2_SMALL_PARAMETERS, GPT2_SMALL_PARAMETERS)
    assert sum(p.numel() for p in meta_gpt2().parameters()) == GPT2_SMALL_PARAMETERS
    assert model.lm_head.weight is model.transformer.wte.weight  # tied: counted once


def test_r8_on_default_targets_prints_peft_line(gpt2, capsys):
    minilora.inject(gpt2, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1))
    minilora.print_trainable_parameters(gpt2)
    ours = capsys.readouterr().out
    peft_model(LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1)).print_trainable_parameters()
    theirs = capsys.readouterr().out
    assert ours == theirs == HEADLINE + "\n"

    count = minilora.count_parameters(gpt2)
    assert (count.trainable, count.total) == (N_LAYER * 8 * (N_EMBD + 3 * N_EMBD), GPT2_SMALL_PARAMETERS + 294_912)
    assert f"{count.percent:.4f}" == "0.2364"
    assert minilora.trainable_parameters_line(gpt2) == HEADLINE


def test_per_layer_breakdown_sums_to_the_trainable_total():
    gpt2 = minilora.inject(meta_gpt2(), LoraConfig(r=8, lora_alpha=32))
    rows = minilora.layer_counts(gpt2)
    assert [row.name for row in rows] == [f"transformer.h.{i}.attn.c_attn" for i in range(N_LAYER)]
    for row in rows:
        assert (row.kind, row.in_features, row.out_features, row.r) == ("Conv1D", 768, 2304, 8)
        assert row.theory == row.counted == 8 * (768 + 2304)
    assert sum(row.counted for row in rows) == minilora.count_parameters(gpt2).trainable == 294_912
    table = minilora.layer_table(gpt2)
    assert table.splitlines()[-1].split()[-2:] == ["294,912", "294,912"]  # the total row
    assert len(table.splitlines()) == 1 + 1 + N_LAYER + 1 + 1  # header, rule, rows, rule, total


# ------------------------------------------------------------------------------------------------
# Counts against PEFT, over targets and bias modes
# ------------------------------------------------------------------------------------------------
CASES = {  # (target_modules, bias)
    "default": (None, "none"),
    "attn+mlp": (["c_attn", "c_proj", "c_fc"], "none"),
    "attn+mlp-bias-all": (["c_attn", "c_proj", "c_fc"], "all"),
    "attn+mlp-bias-lora_only": (["c_attn", "c_proj", "c_fc"], "lora_only"),
    # "c_proj" matches attn.c_proj (768x768) and mlp.c_proj (3072x768); a suffix may have dots
    "suffixes": (["c_proj", "h.0.mlp.c_fc"], "lora_only"),
    "regex": (r".*\.h\.(0|11)\.mlp\.c_fc", "all"),  # a string is a regex on the full name
}


@pytest.mark.parametrize("targets, bias", CASES.values(), ids=CASES.keys())
def test_counts_and_trainable_names_match_peft(targets, bias):
    config = LoraConfig(r=8, lora_alpha=16, target_modules=targets, bias=bias)
    model = minilora.inject(meta_gpt2(), config)
    oracle = peft_model(config)

    assert minilora.find_targets(meta_gpt2(), config) == oracle.targeted_module_names
    assert tuple(minilora.count_parameters(model)) == oracle.get_nb_trainable_parameters()
    assert [peft_key(name) for name in trainable_names(model)] == trainable_names(oracle)

    lora = sum(row.counted for row in minilora.layer_counts(model))
    biases = sum(p.numel() for name, p in model.named_parameters() if p.requires_grad and name.endswith(".bias"))
    assert lora + biases == minilora.count_parameters(model).trainable
    assert (biases == 0) == (bias == "none")


def test_attn_and_mlp_targets_count_by_formula():
    """Per block: c_attn 768->2304, attn.c_proj 768->768, c_fc 768->3072, mlp.c_proj 3072->768."""
    model = minilora.inject(meta_gpt2(), LoraConfig(r=8, target_modules=["c_attn", "c_proj", "c_fc"]))
    per_block = 8 * ((768 + 2304) + (768 + 768) + (768 + 3072) + (3072 + 768))
    assert minilora.count_parameters(model).trainable == N_LAYER * per_block == 1_179_648
    assert len(minilora.layer_counts(model)) == 4 * N_LAYER


# ------------------------------------------------------------------------------------------------
# Freezing
# ------------------------------------------------------------------------------------------------
def test_after_inject_only_lora_parameters_train():
    model = minilora.inject(meta_gpt2(), LoraConfig(r=4, target_modules=["c_attn", "c_fc"]))
    names = trainable_names(model)
    assert names and all(name.rsplit(".", 3)[-3:] in (["lora_A", "default", "weight"], ["lora_B", "default", "weight"])
                         for name in names)
    assert len(names) == 2 * 2 * N_LAYER
    for _, layer in minilora.lora_layers(model):
        assert not any(p.requires_grad for p in layer.base_layer.parameters())


@pytest.mark.parametrize("fan_in_fan_out, make, target, kind", [
    (False, make_tiny_gpt2, ["c_attn"], "Conv1D"),
    (True, lambda: nn.Sequential(nn.Linear(3, 3)), ["0"], "torch.nn.Linear"),
])
def test_contradicting_fan_in_fan_out_is_corrected_with_a_warning(fan_in_fan_out, make, target, kind):
    """As PEFT does: the layer's own layout wins; the warning says so."""
    model = make()
    with pytest.warns(UserWarning, match=f"fan_in_fan_out is set to {fan_in_fan_out}.*`{kind}`"):
        minilora.inject(model, LoraConfig(target_modules=target, fan_in_fan_out=fan_in_fan_out))
    assert all(layer.fan_in_fan_out == (kind == "Conv1D") for _, layer in minilora.lora_layers(model))


# ------------------------------------------------------------------------------------------------
# Taking LoRA out: unload and merge_and_unload
# ------------------------------------------------------------------------------------------------
def adapted_tiny_gpt2(targets=("c_attn", "c_proj", "c_fc")):
    model = make_tiny_gpt2()
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))  # (B, T)
    with torch.no_grad():
        base_logits = model(tokens).logits
    types = [(name, type(module)) for name, module in model.named_modules()]
    torch.manual_seed(0)
    minilora.inject(model, LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), init_lora_weights=False))
    with torch.no_grad():
        adapted_logits = model(tokens).logits
    assert not torch.equal(adapted_logits, base_logits), "the random adapters should change the logits"
    return model, tokens, base_logits, adapted_logits, types


def assert_plain(model, types):
    assert [(name, type(module)) for name, module in model.named_modules()] == types
    assert not list(minilora.lora_layers(model))
    assert not any(".lora_" in key for key in model.state_dict())
    assert not hasattr(model, "minilora_configs")
    assert minilora.count_parameters(model).total == sum(p.numel() for p in make_tiny_gpt2().parameters())


def test_unload_gives_back_the_base_model():
    model, tokens, base_logits, _, types = adapted_tiny_gpt2()
    assert minilora.unload(model) is model
    assert_plain(model, types)
    assert isinstance(model.transformer.h[0].attn.c_attn, Conv1D)
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, base_logits)


def test_unload_of_a_merged_model_unmerges_first():
    model, tokens, base_logits, _, types = adapted_tiny_gpt2()
    minilora.merge(model)
    minilora.unload(model)
    assert_plain(model, types)
    with torch.no_grad():
        diff = (model(tokens).logits - base_logits).abs().max().item()
    assert diff <= 1e-5, f"unload after merge: max |logits - base| = {diff:.2e} (float32 W0 + dW - dW rounding)"


def test_merge_and_unload_keeps_the_adapted_outputs():
    model, tokens, _, adapted_logits, types = adapted_tiny_gpt2()
    expected = {name: layer.base_layer.weight.detach().double() + layer.delta_weight().detach().double()
                for name, layer in minilora.lora_layers(model)}
    assert minilora.merge_and_unload(model) is model
    assert_plain(model, types)
    for name, weight in expected.items():
        got = model.get_submodule(name).weight
        assert (got.double() - weight).abs().max().item() <= 1e-6
    with torch.no_grad():
        diff = (model(tokens).logits - adapted_logits).abs().max().item()
    assert diff <= 1e-5, f"merged vs adapted logits: max |diff| = {diff:.2e}"


def test_merge_and_unload_restores_nn_linear():
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2))
    x = torch.randn(4, 5)
    torch.manual_seed(1)
    minilora.inject(model, LoraConfig(r=3, target_modules=["0", "2"], init_lora_weights=False))
    with torch.no_grad():
        adapted = model(x)
    minilora.merge_and_unload(model)
    assert [type(m) for m in model] == [nn.Linear, nn.Tanh, nn.Linear]
    with torch.no_grad():
        assert (model(x) - adapted).abs().max().item() <= 1e-6


def test_inject_keeps_the_models_mode(tiny_gpt2):
    """A model put in eval mode before inject stays in eval mode: lora_dropout is off inside it."""
    tiny_gpt2.eval()
    minilora.inject(tiny_gpt2, minilora.LoraConfig(r=2, lora_dropout=0.5, target_modules=["c_attn"]))
    assert all(not module.training for module in tiny_gpt2.modules())
    tiny_gpt2.train()
    assert all(layer.lora_dropout.training for _, layer in minilora.lora_layers(tiny_gpt2))
