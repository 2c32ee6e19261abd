"""Inputs that used to give a silently different answer, a hang or a raw traceback (issue 9).

Each refusal is one MiniLoraError that names the problem, and the model is left exactly as it was
(``unchanged``: module types, every tensor bitwise, requires_grad, mode, config).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import minilora
from minilora import MiniLoraError
from minilora.adapters import CONFIG_NAME, LEGACY_WEIGHTS_NAME, PEFT_PREFIX, WEIGHTS_NAME
from parity.twins import randomize_adapters

CONFIG = minilora.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"])
A0 = PEFT_PREFIX + "transformer.h.0.attn.c_attn.lora_A.weight"
INPUT = torch.arange(12).reshape(2, 6)


@pytest.fixture
def adapter(tiny_gpt2, tmp_path):
    trained = copy.deepcopy(tiny_gpt2)
    minilora.inject(trained, CONFIG)
    randomize_adapters(trained, seed=1)
    minilora.save_adapter(trained, tmp_path / "adapter")
    return tmp_path / "adapter"


def edit_config(directory, **changes):
    fields = json.loads((directory / CONFIG_NAME).read_text())
    fields.update(changes)
    (directory / CONFIG_NAME).write_text(json.dumps(fields))


def refused(model, call, match, unchanged):
    check = unchanged(model)
    with pytest.raises(MiniLoraError, match=match):
        call()
    check()


# ------------------------------------------------------------------------------------------------
# Types: "false" is not False
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field, value", [
    ("use_rslora", "false"), ("use_rslora", 0), ("use_rslora", None), ("fan_in_fan_out", "false"),
    ("init_lora_weights", 1), ("init_lora_weights", 0.0), ("init_lora_weights", "true"), ("bias", ["all"]),
    ("r", 4.0), ("r", True), ("lora_alpha", True), ("lora_dropout", False), ("target_modules", [1]),
])
def test_every_config_field_has_its_type_checked(field, value):
    with pytest.raises(MiniLoraError, match=field):
        minilora.LoraConfig(**{field: value})
    config = minilora.LoraConfig()
    setattr(config, field, value)  # a dataclass field changed after construction: inject checks again
    with pytest.raises(MiniLoraError, match=field):
        config.validate()


def test_compat_config_fields_have_their_types_checked():
    from minilora import compat

    for field, value in (("inference_mode", "false"), ("base_model_name_or_path", 3), ("revision", ["main"])):
        with pytest.raises(MiniLoraError, match=field):
            compat.LoraConfig(**{field: value})


@pytest.mark.parametrize("field, value", [
    ("use_rslora", "false"), ("use_rslora", "true"), ("init_lora_weights", 1), ("bias", None), ("r", "4"),
    ("inference_mode", "false"), ("fan_in_fan_out", "true"), ("task_type", 3), ("base_model_name_or_path", []),
])
def test_every_json_field_has_its_type_checked(adapter, tiny_gpt2, unchanged, field, value):
    edit_config(adapter, **{field: value})
    refused(tiny_gpt2, lambda: minilora.load_adapter(tiny_gpt2, adapter), f"{field}", unchanged)


def test_deeply_nested_json_is_an_error(adapter, tiny_gpt2, unchanged):
    (adapter / CONFIG_NAME).write_text('{"r": ' + "[" * 100_000 + "]" * 100_000 + "}")
    refused(tiny_gpt2, lambda: minilora.load_adapter(tiny_gpt2, adapter), "nests JSON values too deeply", unchanged)


# ------------------------------------------------------------------------------------------------
# Values: checked as the model will hold them
# ------------------------------------------------------------------------------------------------
def test_float64_values_that_overflow_float32_are_refused(adapter, tiny_gpt2, unchanged):
    tensors = load_file(adapter / WEIGHTS_NAME)
    big = tensors[A0].double()
    big[0, 0] = 1e300  # finite in float64, inf in the model's float32
    tensors[A0] = big
    save_file(tensors, adapter / WEIGHTS_NAME)
    refused(tiny_gpt2, lambda: minilora.load_adapter(tiny_gpt2, adapter),
            r"lora_A\.default\.weight holds NaN or inf values once cast to the model's torch\.float32", unchanged)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_tensors_are_refused(adapter, tiny_gpt2, unchanged, dtype):
    tensors = load_file(adapter / WEIGHTS_NAME)
    tensors[A0] = tensors[A0].to(dtype)
    save_file(tensors, adapter / WEIGHTS_NAME)
    refused(tiny_gpt2, lambda: minilora.load_adapter(tiny_gpt2, adapter),
            rf"holds {dtype}; adapters hold float16, bfloat16, float32 or float64", unchanged)


def test_absurd_r_is_refused_before_allocating(tiny_gpt2, unchanged):
    refused(tiny_gpt2, lambda: minilora.inject(tiny_gpt2, minilora.LoraConfig(r=2**40, target_modules=["c_attn"])),
            r"r=1099511627776 would need .* GiB .*Pick a smaller r", unchanged)


def test_absurd_r_on_the_command_line_is_one_error_line(capsys):
    from minilora.cli import main

    assert main(["inspect", "--r", str(2**40)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("minilora: error: r=1099511627776 would need")


# ------------------------------------------------------------------------------------------------
# A file that contradicts itself
# ------------------------------------------------------------------------------------------------
def test_config_r_that_differs_from_the_tensors_is_refused_by_a_model_with_layers_of_that_r(
        adapter, tiny_gpt2, unchanged):
    """PEFT's pitfall-1 path: the model already has r=4 layers, the file's tensors are r=4 and its config
    says r=8. The shapes fit the model, but the file contradicts itself (scaling would be alpha / 8)."""
    edit_config(adapter, r=8)
    minilora.inject(tiny_gpt2, CONFIG)
    refused(tiny_gpt2, lambda: minilora.load_adapter(tiny_gpt2, adapter),
            r"adapter_config\.json says r=8 but .* i\.e\. r=4: the config and the weights disagree", unchanged)
