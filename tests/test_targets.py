"""Target selection (minilora/targets.py) against PEFT 0.21.2: the layers picked must be PEFT's.

On tiny random builds of every architecture in parity/architectures.py: target_modules=None (PEFT's
per-architecture default, or both refuse), "all-linear", and PEFT's narrowing selectors
(exclude_modules, layers_to_transform + layers_pattern, modules_to_save) and per-layer patterns
(rank_pattern / alpha_pattern: r and scaling of every layer equal PEFT's).
"""

from __future__ import annotations

import copy
import re
import warnings

import peft
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import minilora
from minilora import MiniLoraError
from minilora.targets import (DEFAULT_TARGET_MODULES, MOE_MODEL_TYPES, MOE_RENAMED_TARGETS, find_targets,
                              is_target, pattern_key, resolve_target_modules)
from parity.architectures import ARCHITECTURES

ARCH_NAMES = list(ARCHITECTURES)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def built():
    """Each tiny architecture built once for the module (the tests deep-copy before changing one)."""
    cache = {}

    def get(name: str) -> nn.Module:
        if name not in cache:
            cache[name] = ARCHITECTURES[name].build()
        return cache[name]
    return get


class PeftUsedTargetParameters(Exception):
    """PEFT put LoRA on bare parameters (MoE experts): minilora must refuse, with a MiniLoraError."""


def peft_targets(model: nn.Module, **fields) -> list[str]:
    """The module names PEFT wraps for these LoraConfig fields (raises what PEFT raises)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**fields))
    if wrapped.peft_config["default"].target_parameters:
        raise PeftUsedTargetParameters(sorted(wrapped.peft_config["default"].target_parameters))
    return list(wrapped.base_model.targeted_module_names)


def both(model: nn.Module, **fields) -> tuple[object, object]:
    """(minilora's target list or its MiniLoraError, PEFT's target list or its exception)."""
    try:
        mine = find_targets(model, minilora.LoraConfig(**fields))
    except MiniLoraError as error:
        mine = error
    try:
        theirs = peft_targets(model, **fields)
    except Exception as error:  # noqa: BLE001 - PEFT's ValueError / NoMatchingPeftModuleError
        theirs = error
    return mine, theirs


def assert_same_choice(mine: object, theirs: object) -> None:
    """Equal layer lists, or both refuse (minilora with a MiniLoraError)."""
    if isinstance(theirs, Exception):
        assert isinstance(mine, MiniLoraError), f"PEFT raised {theirs!r} but minilora picked {mine}"
        if isinstance(theirs, PeftUsedTargetParameters):
            assert "target_parameters" in str(mine)
    else:
        assert not isinstance(mine, Exception), f"minilora raised {mine} but PEFT picked {theirs}"
        assert mine == theirs


# --------------------------------------------------------------------------------------------
# The tables are PEFT's (and transformers') facts, copied: compare them with the installed ones
# --------------------------------------------------------------------------------------------
def test_default_targets_table_is_peft_mapping_key_by_key():
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as mapping

    assert sorted(DEFAULT_TARGET_MODULES) == sorted(mapping)
    for model_type, targets in mapping.items():
        assert DEFAULT_TARGET_MODULES[model_type] == targets, model_type


def test_moe_table_is_what_installed_peft_rewrites():
    from peft.utils.transformers_weight_conversion import _MODEL_TO_CONVERSION_PATTERN, _MOE_TARGET_MODULE_MAPPING
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    rewritten = {kind: family for kind in set(CONFIG_MAPPING_NAMES) | set(_MODEL_TO_CONVERSION_PATTERN)
                 if (family := _MODEL_TO_CONVERSION_PATTERN.get(kind)) in _MOE_TARGET_MODULE_MAPPING
                 and get_checkpoint_conversion_mapping(kind) is not None}
    assert MOE_MODEL_TYPES == rewritten
    for family, names in MOE_RENAMED_TARGETS.items():
        assert set(names) == set(_MOE_TARGET_MODULE_MAPPING[family]), family


# --------------------------------------------------------------------------------------------
# Every architecture: None and "all-linear" pick PEFT's layers
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ARCH_NAMES)
@pytest.mark.parametrize("targets", [None, "all-linear"], ids=["default", "all-linear"])
def test_architecture_targets_equal_peft(built, name, targets):
    assert_same_choice(*both(built(name), target_modules=targets))


def test_architectures_cover_defaults_and_refusals(built):
    """The table of tiny builds exercises both sides: architectures with a PEFT default and without."""
    with_default = [name for name in ARCH_NAMES if ARCHITECTURES[name].model_type in DEFAULT_TARGET_MODULES]
    assert len(ARCH_NAMES) >= 25 and len(with_default) >= 20 and len(ARCH_NAMES) - len(with_default) >= 5


def test_no_default_error_names_peft_and_suggests_layers_not_the_head(built):
    model = built("phi3")
    with pytest.raises(MiniLoraError) as error:
        find_targets(model, minilora.LoraConfig())
    text = str(error.value)
    assert "'phi3'" in text and "PEFT has no default targets" in text and "all-linear" in text
    assert "qkv_proj" in text and "lm_head" not in text


def test_suggestions_leave_out_classification_heads():
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                        vocab_size=64)
    suggestions = minilora.targets.suggest_targets(BertForSequenceClassification(config))
    assert "query" in suggestions and "classifier" not in suggestions


def test_all_linear_on_a_plain_module_keeps_the_last_layer():
    """PEFT excludes the output layer only on a PreTrainedModel; a plain nn.Module keeps every Linear."""
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    mine, theirs = both(model, target_modules="all-linear")
    assert mine == theirs == ["0", "2"]


def test_all_linear_is_case_insensitive_and_written_as_names(built, tmp_path):
    model = copy.deepcopy(built("llama"))
    assert_same_choice(*both(model, target_modules="ALL-Linear"))
    minilora.inject(model, minilora.LoraConfig(target_modules="all-linear"))
    minilora.save_adapter(model, tmp_path)
    import json
    written = json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"]
    assert written == sorted(name for name, _ in minilora.lora_layers(model))


# --------------------------------------------------------------------------------------------
# Mixture of experts: what PEFT rewrites into target_parameters, minilora refuses
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("targets", [None, "all-linear", r".*\.q_proj", ["w1", "w3"], ["gate"]])
def test_moe_rewrites_are_refused(built, targets):
    model = built("mixtral")
    with pytest.raises(MiniLoraError, match="mixture of experts"):
        find_targets(model, minilora.LoraConfig(target_modules=targets))


def test_moe_attention_targets_equal_peft(built):
    assert_same_choice(*both(built("mixtral"), target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))


def test_target_parameters_is_refused():
    from minilora.adapter_config import config_from_fields

    with pytest.raises(MiniLoraError, match="target_parameters"):
        config_from_fields({"peft_type": "LORA", "target_modules": ["q_proj"],
                            "target_parameters": ["experts.gate_up_proj"]}, "adapter_config.json")


# --------------------------------------------------------------------------------------------
# exclude_modules, layers_to_transform / layers_pattern: the same layers as PEFT
# --------------------------------------------------------------------------------------------
SELECTOR_CASES = [
    ("llama", dict(target_modules="all-linear", exclude_modules=["down_proj", "o_proj"])),
    ("llama", dict(target_modules=["q_proj", "v_proj", "up_proj"], exclude_modules=r".*\.1\..*")),
    ("llama", dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[1])),
    ("llama", dict(target_modules=["q_proj", "v_proj"], layers_to_transform=0, layers_pattern="layers")),
    ("llama", dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[0, 1], layers_pattern=["nope", "layers"])),
    ("llama", dict(target_modules=["model.layers.0.self_attn.q_proj"], layers_to_transform=[1])),  # exact name wins
    ("gpt2", dict(target_modules=["c_attn", "c_fc"], layers_to_transform=[1], layers_pattern="h")),
    ("gpt2", dict(target_modules="all-linear", exclude_modules=["c_attn"])),
    ("bert", dict(target_modules=["query", "key", "value", "dense"], layers_to_transform=[0])),
    ("t5", dict(target_modules=["q", "k", "v", "o", "wi", "wo"], layers_to_transform=[1], layers_pattern="block")),
    ("t5", dict(target_modules=["q", "v"], layers_to_transform=[0])),
    ("bart", dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[1], layers_pattern="layers",
                  exclude_modules=r"model\.encoder\..*")),
    ("bert", dict(target_modules=["query", "value"], modules_to_save=["layer.1"])),
    ("gpt2", dict(target_modules=["c_attn"], exclude_modules=["c_attn"])),          # everything excluded
    ("gpt2", dict(target_modules=["c_attn"], layers_to_transform=[7])),             # no such block
]


@pytest.mark.parametrize("name, fields", SELECTOR_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(SELECTOR_CASES)])
def test_selectors_equal_peft(built, name, fields):
    if "modules_to_save" in fields:  # checked name by name (saved modules get their own tests)
        model = built(name)
        from peft.tuners.tuners_utils import check_target_module_exists

        peft_config = peft.LoraConfig(**fields)
        config = minilora.LoraConfig(**{k: v for k, v in fields.items() if k != "modules_to_save"})
        config.modules_to_save = fields["modules_to_save"]
        targets = resolve_target_modules(model, config)
        for module_name, _ in model.named_modules():
            assert is_target(module_name, targets, config) == bool(check_target_module_exists(peft_config, module_name))
        return
    assert_same_choice(*both(built(name), **fields))


def test_selectors_that_leave_nothing_say_which(built):
    with pytest.raises(MiniLoraError, match=r"matches 2 modules .* layers_to_transform=\[7\]"):
        find_targets(built("gpt2"), minilora.LoraConfig(target_modules=["c_attn"], layers_to_transform=[7]))


@pytest.mark.parametrize("fields, message", [
    (dict(target_modules="q_proj", layers_to_transform=[0]), "list of target_modules only"),
    (dict(target_modules=["q_proj"], layers_pattern="layers"), "needs layers_to_transform"),
    (dict(layers_to_transform=[-1]), "ints >= 0"),
    (dict(layers_to_transform=[True]), "ints >= 0"),
    (dict(layers_pattern=3, layers_to_transform=0), "layers_pattern must be"),
    (dict(exclude_modules=[""]), "exclude_modules must be"),
    (dict(rank_pattern={"q_proj": 0}), r"rank_pattern\['q_proj'\] must be a positive int"),
    (dict(rank_pattern={"(": 4}), "not a valid regex"),
    (dict(alpha_pattern={"q_proj": float("nan")}), "must be a positive number"),
    (dict(rank_pattern=[("q_proj", 4)]), "must be a dict"),
])
def test_selector_validation(fields, message):
    with pytest.raises(MiniLoraError, match=message):
        minilora.LoraConfig(**fields)


# --------------------------------------------------------------------------------------------
# rank_pattern / alpha_pattern: PEFT's get_pattern_key, and per-layer r and scaling
# --------------------------------------------------------------------------------------------
NAMES = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.10.mlp.up_proj",
         "q_proj", "encoder.block.1.layer.0.SelfAttention.q", "h.0.attn.c_attn"]
PATTERNS = ["q_proj", "q", r"layers\.1\..*", r".*\.1\.self_attn\.q_proj", "up_proj", "proj", r"mlp\.up_proj",
            r"layers.1.self_attn.q_proj", "c_attn", r"h\.\d+\.attn\.c_attn"]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(PATTERNS), unique=True, max_size=4), st.sampled_from(NAMES))
def test_pattern_key_is_peft_get_pattern_key(patterns, name):
    from peft.utils.other import get_pattern_key

    theirs = get_pattern_key(patterns, name)
    mine = pattern_key(patterns, name)
    assert mine == (theirs if theirs in patterns else None)


PATTERN_CASES = [
    ("llama", dict(target_modules="all-linear", r=4, lora_alpha=8,
                   rank_pattern={r"layers\.1\.self_attn\.q_proj": 2, "down_proj": 6},
                   alpha_pattern={"q_proj": 3, r".*mlp.*": 5})),
    ("gpt2", dict(target_modules=["c_attn", "c_proj"], r=2, rank_pattern={"mlp.c_proj": 5},
                  alpha_pattern={r"h\.0\.attn\.c_attn": 7}, use_rslora=True)),
    ("t5", dict(target_modules=["q", "k", "v", "o", "wi", "wo"], rank_pattern={"wo": 3, "q": 1}, alpha_pattern={"o": 9})),
]


@pytest.mark.parametrize("name, fields", PATTERN_CASES, ids=[case[0] for case in PATTERN_CASES])
def test_rank_and_alpha_patterns_equal_peft(built, name, fields):
    """Per layer: r (the shapes of A and B), lora_alpha and scaling equal PEFT's; same seed, same A and B."""
    from parity.twins import peft_key

    model = built(name)
    mini = copy.deepcopy(model)
    torch.manual_seed(0)
    minilora.inject(mini, minilora.LoraConfig(init_lora_weights="gaussian", **fields))
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        twin = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(init_lora_weights="gaussian", **fields))
    peft_modules = dict(twin.base_model.model.named_modules())
    ranks = set()
    for layer_name, layer in minilora.lora_layers(mini):
        theirs = peft_modules[layer_name]
        assert (layer.r, layer.lora_alpha, layer.scaling) == (theirs.r, theirs.lora_alpha, theirs.scaling), layer_name
        ranks.add(layer.r["default"])
    assert len(ranks) > 1  # the patterns did something
    peft_state = twin.state_dict()
    for key, value in mini.state_dict().items():
        if ".lora_" in key:
            assert torch.equal(value, peft_state[peft_key(key)]), key


@pytest.mark.parametrize("name, fields", PATTERN_CASES[:2], ids=[case[0] for case in PATTERN_CASES[:2]])
def test_files_with_patterns_load_both_ways(built, name, fields, tmp_path):
    """adapter_config.json keeps rank_pattern / alpha_pattern / layers_to_transform / exclude_modules as PEFT does."""
    from parity.twins import randomize_adapters

    model = built(name)
    inputs = {"input_ids": torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(0))}
    listed = not isinstance(fields["target_modules"], str)
    fields = {**fields, "layers_to_transform": [0, 1] if listed else None, "exclude_modules": None if listed else ["o_proj"]}
    mini = copy.deepcopy(model)
    minilora.inject(mini, minilora.LoraConfig(**fields))
    randomize_adapters(mini, seed=3)
    minilora.save_adapter(mini, tmp_path / "mini")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "mini")
        with torch.no_grad():
            assert torch.equal(mini(**inputs).logits, loaded(**inputs).logits)
        loaded.save_pretrained(tmp_path / "peft")
    back = minilora.load_adapter(copy.deepcopy(model), tmp_path / "peft")
    with torch.no_grad():
        assert torch.equal(back(**inputs).logits, mini(**inputs).logits)
    assert [(n, layer.r, layer.scaling) for n, layer in minilora.lora_layers(back)] == \
        [(n, layer.r, layer.scaling) for n, layer in minilora.lora_layers(mini)]


def test_pattern_matching_no_layer_is_allowed(built):
    """As in PEFT (which warns), a pattern that matches no targeted layer changes nothing."""
    model = copy.deepcopy(built("gpt2"))
    minilora.inject(model, minilora.LoraConfig(target_modules=["c_attn"], r=2, rank_pattern={"nothing_here": 9}))
    assert {layer.r["default"] for _, layer in minilora.lora_layers(model)} == {2}


def test_regex_targets_still_fullmatch(built):
    model = built("llama")
    assert_same_choice(*both(model, target_modules=r"model\.layers\.1\.self_attn\.(q|k)_proj"))
    assert not re.fullmatch(r"q_proj", "model.layers.0.self_attn.q_proj")


@pytest.mark.parametrize("config", [{"model_type": "llama"}, {"hidden": 4}], ids=["dict-llama", "dict-no-type"])
def test_model_type_from_a_plain_dict_config_as_peft(config):
    """A custom nn.Module with ``config`` a dict: PEFT reads model_type from it (or finds none)."""
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = config
            self.q_proj = nn.Linear(4, 4)
            self.v_proj = nn.Linear(4, 4)

    assert_same_choice(*both(Custom(), target_modules=None))


def test_a_long_plain_full_name_regex_selects_as_peft(built):
    """Review finding: bounded_regex counted each literal character as one position and refused any regex over
    100,000 of them, so a plain full-name alternation as long as an MoE's expert list (here the model's attention
    names among 5,400 experts' made-up names, ~245,000 characters, ~135,000 positions once re has factored the
    common prefix, no repeat) was refused, though PEFT reads it. Now only a blow-up (repeats unrolling to more
    than 4 positions a character) is bounded at 100,000."""
    from minilora import bounded_regex

    model = built("llama")
    real = [name for name, _ in model.named_modules() if name.endswith(("q_proj", "v_proj"))]
    experts = [f"model.layers.{i}.mlp.experts.{j}.{p}" for i in range(18) for j in range(100)
               for p in ("gate_proj", "up_proj", "down_proj")]
    pattern = "|".join(re.escape(name) for name in experts[:1200] + real + experts[1200:])
    assert bounded_regex._unrolled_size(bounded_regex._re_parser.parse(pattern)) > 120_000  # (re factors prefixes)
    mine, theirs = both(model, target_modules=pattern)
    assert not isinstance(theirs, Exception) and sorted(theirs) == sorted(real)
    assert mine == theirs or sorted(mine) == sorted(theirs)


def test_a_regex_that_repeats_is_still_bounded_as_before():
    """The hostile cases stay refused before compiling: a counted repeat of a short pattern, and a plain regex
    over MAX_PLAIN_SIZE characters (refused before re parses it)."""
    from minilora import bounded_regex

    with pytest.raises(MiniLoraError, match=r"unrolls to about 6e\+09"):
        bounded_regex.fullmatch("(c_attn){1000000000}", "c_attn")
    with pytest.raises(MiniLoraError, match=r"repeats so much"):
        bounded_regex.fullmatch("x" * 30_000 + "(ab){10}" * 1 + "(c){200000}", "x")
    with pytest.raises(MiniLoraError, match=r"positions long, more than the 2000000"):
        bounded_regex.fullmatch("a" * (bounded_regex.MAX_PLAIN_SIZE + 1), "a")


def test_a_regex_only_res_compile_step_rejects_is_refused_as_peft_fails():
    """A look-behind of varying width parses, and the regex module compiles it; Python's re (PEFT's engine)
    refuses it at compile time, so PEFT fails: minilora must refuse too, not match with regex's meaning."""
    fields = dict(target_modules=["c_attn"], exclude_modules="(?<=a+)1")
    with pytest.raises(re.error):
        peft.get_peft_model(minilora.models.tiny_gpt2(0), peft.LoraConfig(**fields))
    with pytest.raises(minilora.MiniLoraError, match="look-behind requires fixed-width pattern"):
        minilora.inject(minilora.models.tiny_gpt2(0), minilora.LoraConfig(**fields))
