"""Inputs that used to give a silently different answer, a hang or a raw traceback (issue 9).

Each refusal is one MiniLoraError that names the problem, and the model is left exactly as it was
(``unchanged``: module types, every tensor bitwise, requires_grad, mode, config).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

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
ROOT = Path(__file__).resolve().parents[1]


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


def test_benchmarks_write_into_an_ignored_folder_by_default():
    """python -m benchmarks --quick leaves no untracked files: its default --out is ignored by git."""
    from benchmarks.cli import DEFAULT_OUT

    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    done = subprocess.run(["git", "check-ignore", "-q", str(DEFAULT_OUT / "quick.json")], cwd=ROOT)
    assert done.returncode == 0, f"{DEFAULT_OUT} is not ignored by .gitignore"


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


# ------------------------------------------------------------------------------------------------
# Regexes from files are bounded; a config changed after inject is refused at save time
# ------------------------------------------------------------------------------------------------
HOSTILE = r"(.+)+X"


def test_a_backtracking_regex_in_a_file_does_not_hang(adapter, tmp_path):
    """In a child process with a time limit: with re, (.+)+X on a 40-character name runs for hours.
    The same for the other selectors that are regexes or pasted into one."""
    edit_config(adapter, target_modules=HOSTILE)
    code = ("import minilora; from minilora.models import tiny_gpt2\n"
            f"try: minilora.load_adapter(tiny_gpt2(), {str(adapter)!r})\n"
            "except minilora.MiniLoraError as error: print('refused:', error)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert "refused:" in done.stdout and "matches no module" in done.stdout, done.stdout


def test_a_regex_that_runs_out_of_time_is_an_error(tiny_gpt2, unchanged, monkeypatch):
    from minilora import bounded_regex

    monkeypatch.setattr(bounded_regex, "MATCH_SECONDS", 1e-6)
    config = minilora.LoraConfig(r=2, target_modules=r"(.*[a-z]){25}[0-9]")
    refused(tiny_gpt2, lambda: minilora.inject(tiny_gpt2, config), r"took more than .* s to match .*Simplify",
            unchanged)


def test_the_bounded_regex_selects_what_re_selects(tiny_gpt2):
    import re

    from minilora.targets import find_targets

    names = [name for name, _ in tiny_gpt2.named_modules() if name]
    for pattern in (r".*c_attn", r".*\.h\.[01]\.(attn|mlp)\.c_(attn|fc)", r"transformer\.h\.\d+\.mlp\.c_proj",
                    r"(?i).*C_ATTN"):
        config = minilora.LoraConfig(target_modules=pattern)
        assert find_targets(tiny_gpt2, config) == [n for n in names if re.fullmatch(pattern, n)], pattern


@pytest.mark.parametrize("targets", [["c_attn", "c_proj"], ["c_fc"], r".*c_attn", r".*attn\.c_attn.*"])
def test_target_modules_changed_after_inject_is_refused_at_save(tiny_gpt2, tmp_path, targets, unchanged):
    config = minilora.LoraConfig(r=2, target_modules=["c_attn"])
    minilora.inject(tiny_gpt2, config)
    config.target_modules = targets
    if targets in (r".*c_attn", r".*attn\.c_attn.*"):  # the same layers, written as a regex: fine
        minilora.save_adapter(tiny_gpt2, tmp_path)
        minilora.load_adapter(minilora.models.tiny_gpt2(), tmp_path)
        return
    refused(tiny_gpt2, lambda: minilora.save_adapter(tiny_gpt2, tmp_path),
            r"now selects .* but the model's LoRA layers are .*changed after inject", unchanged)
    assert not any(tmp_path.iterdir())


def test_a_config_made_invalid_after_inject_is_refused_at_save(tiny_gpt2, tmp_path, unchanged):
    config = minilora.LoraConfig(r=2, target_modules=["c_attn"])
    minilora.inject(tiny_gpt2, config)
    config.use_rslora = "false"
    refused(tiny_gpt2, lambda: minilora.save_adapter(tiny_gpt2, tmp_path), "changed after inject .*use_rslora",
            unchanged)


def test_loading_into_existing_layers_takes_every_number_from_the_file(tiny_gpt2, tmp_path):
    """The pitfall-1 path (layers built from one config, a file saved with another of the same r):
    every layer ends with the file's r, lora_alpha, scaling (rsLoRA) and dropout, and so does the
    model's config; the outputs are those of the file loaded into a fresh model."""
    from minilora.inject import DEFAULT_ADAPTER as ADAPTER_NAME, adapter_config

    saved = copy.deepcopy(tiny_gpt2)
    file_config = minilora.LoraConfig(r=4, lora_alpha=16, lora_dropout=0.3, use_rslora=True, target_modules=["c_attn"])
    minilora.inject(saved, file_config)
    randomize_adapters(saved, seed=3)
    minilora.save_adapter(saved, tmp_path)

    model = copy.deepcopy(tiny_gpt2)
    minilora.inject(model, minilora.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["c_attn"]))
    model.train()
    minilora.load_adapter(model, tmp_path, is_trainable=True)
    for name, layer in minilora.lora_layers(model):
        assert layer.r[ADAPTER_NAME] == 4 and layer.lora_alpha[ADAPTER_NAME] == 16, name
        assert layer.scaling[ADAPTER_NAME] == 16 / 2  # alpha / sqrt(r)
        dropout = layer.lora_dropout[ADAPTER_NAME]
        assert isinstance(dropout, torch.nn.Dropout) and dropout.p == 0.3 and dropout.training, name
    config = adapter_config(model)
    assert (config.r, config.lora_alpha, config.lora_dropout, config.use_rslora) == (4, 16, 0.3, True)
    fresh = minilora.load_adapter(copy.deepcopy(tiny_gpt2), tmp_path)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(INPUT).logits, fresh(INPUT).logits)


# ------------------------------------------------------------------------------------------------
# After the fused path, the plain model owns its weights
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("take_out", ["unload", "merge_and_unload"])
def test_plain_weights_after_the_fused_path_have_their_own_contiguous_storage(tiny_gpt2, take_out, tmp_path):
    import io

    reference = copy.deepcopy(tiny_gpt2)
    minilora.inject(reference, minilora.LoraConfig(r=4, target_modules=["c_attn", "c_fc"]))
    randomize_adapters(reference, seed=4)
    model = copy.deepcopy(reference)
    minilora.set_forward_path(model, "fused")
    with torch.no_grad():
        model(INPUT)  # builds [W0; A] and makes W0, its bias and A views of it
    plain = getattr(minilora, take_out)(model)
    expected = getattr(minilora, take_out)(reference)
    for name, module in plain.named_modules():
        if name.endswith(("c_attn", "c_fc")):
            for tensor in (module.weight, module.bias):
                assert tensor.is_contiguous(), name
                assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size(), name
    assert plain.state_dict().keys() == expected.state_dict().keys()
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in expected.state_dict().items())
    saved, wanted = io.BytesIO(), io.BytesIO()
    torch.save(plain.state_dict(), saved), torch.save(expected.state_dict(), wanted)
    assert len(saved.getvalue()) == len(wanted.getvalue())  # no adapter rows stored along


# ------------------------------------------------------------------------------------------------
# torch.save(model.state_dict()) taken while merged
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("saved_merged, target_merged", [(True, False), (False, True), (True, True), (False, False)])
def test_state_dict_round_trips_exactly_merged_or_not(tiny_gpt2, saved_merged, target_merged):
    """One of README's two consistent pairs. Taken while merged, W0 holds W0 + dW: loaded into an
    unmerged model the update used to be applied twice ("All keys matched")."""
    import io

    source = copy.deepcopy(tiny_gpt2)
    minilora.inject(source, minilora.LoraConfig(r=4, target_modules=["c_attn"]))
    randomize_adapters(source, seed=5)
    with torch.no_grad():
        expected = source(INPUT).logits
    if saved_merged:
        minilora.merge(source)
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)

    target = copy.deepcopy(tiny_gpt2)
    minilora.inject(target, minilora.LoraConfig(r=4, target_modules=["c_attn"]))
    randomize_adapters(target, seed=6)  # other values: everything must come from the file
    if target_merged:
        minilora.merge(target)
    result = target.load_state_dict(torch.load(buffer, weights_only=True))
    assert not result.missing_keys and not result.unexpected_keys
    assert all(layer.merged == saved_merged for _, layer in minilora.lora_layers(target))
    with torch.no_grad():
        assert (target(INPUT).logits - expected).abs().max() <= 1e-5
    if saved_merged:
        minilora.unmerge(target)
    with torch.no_grad():  # and unmerging gives the unmerged model back
        assert (target(INPUT).logits - expected).abs().max() <= 1e-5


# ------------------------------------------------------------------------------------------------
# Tied weights: GPT-2's lm_head shares its weight with the input embedding wte
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def tied_adapted(tiny_gpt2):
    assert tiny_gpt2.lm_head.weight is tiny_gpt2.transformer.wte.weight
    with pytest.warns(UserWarning, match=r"lm_head'\] are tied to \['transformer\.wte\.weight'\]"):
        minilora.inject(tiny_gpt2, minilora.LoraConfig(r=4, target_modules=["c_attn", "lm_head"]))
    randomize_adapters(tiny_gpt2, seed=7)
    with torch.no_grad():
        return tiny_gpt2, tiny_gpt2(INPUT).logits, tiny_gpt2.transformer.wte.weight.detach().clone()


def test_merging_a_tied_target_unties_it_and_merged_equals_unmerged(tied_adapted):
    model, unmerged, wte = tied_adapted
    with pytest.warns(UserWarning, match="Merging unties this layer's weight from"):
        minilora.merge(model)
    with torch.no_grad():
        merged = model(INPUT).logits
    assert (merged - unmerged).abs().max() <= 1e-5 * unmerged.abs().max()
    assert torch.equal(model.transformer.wte.weight, wte)  # the embedding did not take the update
    minilora.unmerge(model)
    assert model.lm_head.base_layer.weight is model.transformer.wte.weight  # tied again, exactly
    with torch.no_grad():  # (c_attn's W0 - dW + dW is W0 up to rounding)
        assert (model(INPUT).logits - unmerged).abs().max() <= 1e-5 * unmerged.abs().max()


def test_merge_and_unload_of_a_tied_target_saves_and_loads_as_merged(tied_adapted, tmp_path):
    from transformers import AutoModelForCausalLM

    model, unmerged, wte = tied_adapted
    with pytest.warns(UserWarning, match=r"Setting `tie_word_embeddings=False` in the model config"):
        plain = minilora.merge_and_unload(model)
    plain.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        for result in (plain(INPUT).logits, reloaded(INPUT).logits):
            assert (result - unmerged).abs().max() <= 1e-5 * unmerged.abs().max()
    assert torch.equal(reloaded.transformer.wte.weight, wte)


def test_minilora_merge_of_a_tied_target_writes_a_model_with_the_adapted_outputs(tied_adapted, tiny_gpt2, tmp_path):
    from transformers import AutoModelForCausalLM

    from minilora.cli import main

    model, unmerged, _ = tied_adapted
    minilora.save_adapter(model, tmp_path / "adapter")
    base = minilora.models.tiny_gpt2()
    base.save_pretrained(tmp_path / "base")
    assert main(["merge", str(tmp_path / "adapter"), str(tmp_path / "merged"), "--model", str(tmp_path / "base")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert (merged(INPUT).logits - unmerged).abs().max() <= 1e-5 * unmerged.abs().max()


def test_state_dict_of_a_merged_tied_model_round_trips(tied_adapted, tiny_gpt2):
    import io

    model, unmerged, wte = tied_adapted
    with pytest.warns(UserWarning):
        minilora.merge(model)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    target = minilora.models.tiny_gpt2()
    with pytest.warns(UserWarning):
        minilora.inject(target, minilora.LoraConfig(r=4, target_modules=["c_attn", "lm_head"]))
        target.load_state_dict(torch.load(buffer, weights_only=True))
    with torch.no_grad():
        assert (target(INPUT).logits - unmerged).abs().max() <= 1e-5 * unmerged.abs().max()
    assert torch.equal(target.transformer.wte.weight, wte)


# ------------------------------------------------------------------------------------------------
# bias="all" / "lora_only": the biases train in place, so "off" is not the base model
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_disabled_and_unload_warn_when_biases_trained(tiny_gpt2, bias):
    minilora.inject(tiny_gpt2, minilora.LoraConfig(r=2, target_modules=["c_attn"], bias=bias))
    with pytest.warns(UserWarning, match=f"bias configured to be '{bias}' does not produce the same output"):
        with minilora.disabled(tiny_gpt2):
            pass
    with pytest.warns(UserWarning, match=f"bias configured to be '{bias}' does not produce the same output"):
        minilora.unload(tiny_gpt2)


def test_no_bias_warning_when_biases_are_frozen(tiny_gpt2):
    import warnings

    minilora.inject(tiny_gpt2, minilora.LoraConfig(r=2, target_modules=["c_attn"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with minilora.disabled(tiny_gpt2):
            pass
        minilora.unload(tiny_gpt2)
