"""Bad input: one clear MiniLoraError, raised before the model is touched.

For every mistake a user can make when asking for LoRA, check the message says what was wrong
(and names what to use instead), and that the model afterwards is exactly as it was: the same
module types at the same names, the same tensors bit for bit, the same requires_grad flags.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import minilora
from conftest import make_tiny_gpt2, record_model
from minilora import LoraConfig, MiniLoraError


class MLP(nn.Module):
    """A plain nn.Linear model: no architecture default, so targets must be named."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(6, 12)
        self.act = nn.GELU()
        self.norm = nn.LayerNorm(12)
        self.down = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.norm(self.act(self.up(x))))


def models():
    """Each case runs on GPT-2's layout (Conv1D) and on a plain nn.Linear model."""
    return [pytest.param(make_tiny_gpt2, id="gpt2"), pytest.param(MLP, id="mlp")]


def partly_frozen(make) -> nn.Module:
    """A model whose flags are not all True, so a stray requires_grad_ in either direction shows."""
    model = make()
    next(model.parameters()).requires_grad_(False)
    return model


def expect_error(model: nn.Module, config, match: str) -> MiniLoraError:
    check = record_model(model)
    with pytest.raises(MiniLoraError, match=match) as caught:
        minilora.inject(model, config)
    check()
    return caught.value


# ------------------------------------------------------------------------------------------------
# Targets
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", models())
def test_target_list_matching_nothing_lists_available_names(make):
    model = partly_frozen(make)
    error = expect_error(model, LoraConfig(target_modules=["q_proj", "v_proj"]), "matches no module")
    available = ["c_attn", "c_proj", "c_fc"] if make is make_tiny_gpt2 else ["up", "down"]
    for name in available:
        assert name in str(error)


@pytest.mark.parametrize("make", models())
def test_regex_matching_nothing_lists_available_names(make):
    model = partly_frozen(make)
    error = expect_error(model, LoraConfig(target_modules=r".*\.q_proj"), "matches no module")
    assert ("c_attn" if make is make_tiny_gpt2 else "up") in str(error)


def test_regex_must_match_the_full_name():
    """As in PEFT, a regex string must match the whole module name, not a part of it."""
    model = make_tiny_gpt2()
    expect_error(model, LoraConfig(target_modules="c_attn"), "matches no module")


@pytest.mark.parametrize("regex", ["c_attn[", r".*\.(c_attn"])
def test_invalid_regex_is_named(regex):
    model = make_tiny_gpt2()
    error = expect_error(model, LoraConfig(target_modules=regex), "not a valid")
    assert repr(regex) in str(error)


@pytest.mark.parametrize("make, target, type_name", [
    (make_tiny_gpt2, ["ln_1"], "LayerNorm"),
    (make_tiny_gpt2, ["attn"], "GPT2Attention"),
    (make_tiny_gpt2, ["wte"], "Embedding"),
    (make_tiny_gpt2, r".*\.mlp", "GPT2MLP"),
    (MLP, ["norm"], "LayerNorm"),
    (MLP, ["up", "act"], "GELU"),
], ids=["ln_1", "attn", "wte", "regex-mlp", "mlp-norm", "mlp-act"])
def test_target_that_is_not_linear_names_its_type(make, target, type_name):
    """Also when other targets are fine: one bad target and nothing is wrapped."""
    model = partly_frozen(make)
    error = expect_error(model, LoraConfig(target_modules=target), type_name)
    assert "Linear or Conv1D" in str(error)


@pytest.mark.parametrize("layer", [nn.Linear(4, 2), Conv1D(2, 4)], ids=["Linear", "Conv1D"])
def test_a_bare_linear_layer_as_the_model_says_how_to_wrap_it(layer):
    error = expect_error(layer, LoraConfig(target_modules=["linear"]), "itself a single")
    assert "LoraLinear(layer" in str(error) and "nn.Sequential" in str(error)


def test_no_default_targets_for_an_unknown_architecture():
    model = MLP()
    error = expect_error(model, LoraConfig(), "no default targets")
    assert "up" in str(error)


# ------------------------------------------------------------------------------------------------
# Injecting twice
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make, target", [(make_tiny_gpt2, None), (MLP, ["up"])], ids=["gpt2", "mlp"])
@pytest.mark.parametrize("second_target", ["same", "other"])
def test_injecting_twice_is_refused(make, target, second_target):
    model = make()
    minilora.inject(model, LoraConfig(target_modules=target, init_lora_weights=False))
    again = target if second_target == "same" else (["c_fc"] if make is make_tiny_gpt2 else ["down"])
    error = expect_error(model, LoraConfig(target_modules=again), "already has minilora layers")
    assert "unload" in str(error)


def test_a_bare_lora_linear_counts_as_already_injected():
    model = nn.Sequential(minilora.LoraLinear(nn.Linear(3, 3), r=2))
    expect_error(model, LoraConfig(target_modules=["0"]), "already has minilora layers")


# ------------------------------------------------------------------------------------------------
# Config values: refused when the config is built, and again by inject if changed afterwards
# ------------------------------------------------------------------------------------------------
BAD_FIELDS = [
    ("r", 0, "r must be a positive int"),
    ("r", -4, "r must be a positive int"),
    ("r", 2.0, "r must be a positive int"),
    ("r", True, "r must be a positive int"),
    ("lora_alpha", 0, "lora_alpha must be a positive"),
    ("lora_alpha", float("nan"), "lora_alpha must be a positive"),
    ("lora_dropout", 1.0, r"lora_dropout must be in \[0, 1\)"),
    ("lora_dropout", -0.1, r"lora_dropout must be in \[0, 1\)"),
    ("lora_dropout", 1.5, r"lora_dropout must be in \[0, 1\)"),
    ("bias", "lora", "bias must be one of"),
    ("bias", "None", "bias must be one of"),
    ("init_lora_weights", "pissa", "init_lora_weights must be"),
    ("target_modules", [], "target_modules must be"),
    ("target_modules", ["c_attn", 3], "target_modules must be"),
]
BAD_IDS = [f"{field}={value!r}" for field, value, _ in BAD_FIELDS]


@pytest.mark.parametrize("field, value, match", BAD_FIELDS, ids=BAD_IDS)
def test_bad_config_value_is_refused_at_construction(field, value, match):
    with pytest.raises(MiniLoraError, match=match) as caught:
        LoraConfig(**{field: value})
    assert repr(value) in str(caught.value) or field == "target_modules"


@pytest.mark.parametrize("field, value, match", BAD_FIELDS, ids=BAD_IDS)
def test_bad_config_value_set_after_construction_leaves_the_model_unchanged(field, value, match):
    """A dataclass field can be changed after __init__; inject checks again before touching the model."""
    model = partly_frozen(make_tiny_gpt2)
    config = LoraConfig(target_modules=["c_attn", "c_fc"])
    setattr(config, field, value)
    expect_error(model, config, match)


def test_unknown_bias_message_lists_the_modes():
    with pytest.raises(MiniLoraError) as caught:
        LoraConfig(bias="lora")
    for mode in ("none", "all", "lora_only"):
        assert mode in str(caught.value)


def test_inject_needs_a_minilora_config():
    import peft

    model = make_tiny_gpt2()
    expect_error(model, peft.LoraConfig(r=8), "needs a minilora.LoraConfig")


@pytest.mark.parametrize("r", [0, -1, 1.5])
def test_lora_linear_refuses_bad_r_and_leaves_the_layer(r):
    base = nn.Linear(4, 4)
    weight = base.weight.detach().clone()
    with pytest.raises(MiniLoraError, match="r must be a positive int"):
        minilora.LoraLinear(base, r=r)
    assert torch.equal(base.weight, weight) and base.weight.requires_grad


def test_lora_linear_refuses_a_layer_that_is_not_linear():
    with pytest.raises(MiniLoraError, match="not Embedding"):
        minilora.LoraLinear(nn.Embedding(4, 4))


# ------------------------------------------------------------------------------------------------
# Calls that need LoRA layers, on a model without them
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("action", [
    minilora.merge, minilora.unmerge, minilora.merge_and_unload, minilora.unload,
    lambda model: minilora.disabled(model).__enter__(),
], ids=["merge", "unmerge", "merge_and_unload", "unload", "disabled"])
def test_lora_operations_on_a_plain_model_say_to_inject_first(action):
    model = MLP()
    check = record_model(model)
    with pytest.raises(MiniLoraError, match="inject"):
        action(model)
    check()


def test_disabled_refuses_a_merged_model_and_leaves_it_merged():
    model = MLP()
    minilora.inject(model, LoraConfig(target_modules=["up", "down"], init_lora_weights=False))
    minilora.merge(model)
    check = record_model(model)
    with pytest.raises(MiniLoraError, match="unmerge"):
        with minilora.disabled(model):
            pass
    check()
    assert all(layer.merged and not layer.disabled for _, layer in minilora.lora_layers(model))


# ------------------------------------------------------------------------------------------------
# Loading a model, and the demo's command line
# ------------------------------------------------------------------------------------------------
def test_load_model_with_a_missing_path_says_what_to_pass(tmp_path):
    with pytest.raises(MiniLoraError, match="local directory"):
        minilora.load_model(str(tmp_path / "no-such-model"))


@pytest.mark.parametrize("argv, message", [(["--r", "0"], "r must be a positive int"),
                                           (["--alpha", "-1"], "lora_alpha must be a positive")])
def test_demo_reports_bad_arguments_without_a_traceback(argv, message, capsys):
    from minilora import demo

    with pytest.raises(SystemExit) as caught:
        demo.main(argv)
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_demo_fails_when_merging_gives_nan(tiny_gpt2, tmp_path, monkeypatch, capsys):
    """The demo's own check (merged == unmerged) exits 1 for a NaN difference too (NaN > tolerance is False)."""
    from minilora import demo

    tiny_gpt2.save_pretrained(tmp_path / "tiny")
    merge = minilora.merge

    def merge_to_nan(model):
        merge(model)
        for _, layer in minilora.lora_layers(model):
            layer.base_layer.weight.data.fill_(float("nan"))

    monkeypatch.setattr(minilora, "merge", merge_to_nan)
    with pytest.raises(SystemExit) as caught:
        demo.main(["--model", str(tmp_path / "tiny")])
    assert caught.value.code == 1 and "this is a bug in minilora" in capsys.readouterr().err


def test_load_model_with_unreadable_config_is_a_clear_error(tmp_path):
    """A directory whose config.json transformers cannot read: MiniLoraError, not a bare ValueError."""
    (tmp_path / "config.json").write_text('{"model_type": "no-such-architecture"}')
    with pytest.raises(minilora.MiniLoraError, match="Could not load model"):
        minilora.load_model(str(tmp_path))
