"""Bad adapters and bad calls: each raises MiniLoraError naming the problem, and the model is left
exactly as it was (module types, every tensor bitwise, requires_grad, mode: the ``unchanged`` fixture).

Ends with a fuzz test: a fixed-seed sample of corrupted files (truncated, bytes overwritten in
headers and data, broken JSON), each of which must either fail cleanly or load exactly what an
independent reader finds in the file.
"""

from __future__ import annotations

import copy
import json
import math
import random
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import minilora
from minilora import MiniLoraError
from minilora.adapters import CONFIG_NAME, LEGACY_WEIGHTS_NAME, PEFT_PREFIX, WEIGHTS_NAME
from parity.twins import randomize_adapters

CONFIG = minilora.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"])
A0 = PEFT_PREFIX + "transformer.h.0.attn.c_attn.lora_A.weight"
B1 = PEFT_PREFIX + "transformer.h.1.attn.c_attn.lora_B.weight"


@pytest.fixture
def adapter(tiny_gpt2, tmp_path) -> Path:
    """A trained-looking (non-zero) adapter for the tiny GPT-2, saved by minilora."""
    trained = copy.deepcopy(tiny_gpt2)
    minilora.inject(trained, CONFIG)
    randomize_adapters(trained, seed=1)
    minilora.save_adapter(trained, tmp_path / "adapter")
    return tmp_path / "adapter"


def edit_config(directory: Path, **changes) -> None:
    fields = json.loads((directory / CONFIG_NAME).read_text())
    fields.update(changes)
    (directory / CONFIG_NAME).write_text(json.dumps(fields))


def edit_weights(directory: Path, change) -> None:
    tensors = load_file(directory / WEIGHTS_NAME)
    change(tensors)
    save_file(tensors, directory / WEIGHTS_NAME)


def _set(key, value):
    return lambda tensors: tensors.__setitem__(key, value)


# (id, how to spoil the adapter directory, what the error must say)
BAD_DIRECTORIES = [
    ("config-missing", lambda d: (d / CONFIG_NAME).unlink(), r"adapter_config\.json is missing"),
    ("weights-missing", lambda d: (d / WEIGHTS_NAME).unlink(), r"no adapter_model\.safetensors \(nor the older"),
    ("weights-truncated", lambda d: (d / WEIGHTS_NAME).write_bytes((d / WEIGHTS_NAME).read_bytes()[:300]),
     r"adapter_model\.safetensors could not be read .*truncated or corrupt"),
    ("weights-empty", lambda d: (d / WEIGHTS_NAME).write_bytes(b""), r"could not be read"),
    ("bin-garbage", lambda d: ((d / WEIGHTS_NAME).unlink(), (d / LEGACY_WEIGHTS_NAME).write_bytes(b"PK\x03\x04junk")),
     r"adapter_model\.bin could not be read"),
    ("bin-not-a-dict", lambda d: ((d / WEIGHTS_NAME).unlink(), torch.save([torch.ones(2)], d / LEGACY_WEIGHTS_NAME)),
     r"does not hold a dict of named tensors"),
    ("json-invalid", lambda d: (d / CONFIG_NAME).write_text('{"r": 4, '), r"is not valid JSON"),
    ("json-not-object", lambda d: (d / CONFIG_NAME).write_text("[4, 8]"), r"holds a JSON list"),
    ("json-not-utf8", lambda d: (d / CONFIG_NAME).write_bytes(b'{"r": "\xff"}'), r"is not valid JSON"),
    ("other-peft-type", lambda d: edit_config(d, peft_type="IA3"), r"peft_type is 'IA3'; minilora reads LoRA"),
    ("no-peft-type", lambda d: edit_config(d, peft_type=None), r"peft_type is None"),
    ("use_dora", lambda d: edit_config(d, use_dora=True), r"cannot honour use_dora=True \(DoRA"),
    ("modules_to_save-not-in-file", lambda d: edit_config(d, modules_to_save=["lm_head"]), r"missing keys \[.*lm_head\.modules_to_save"),
    ("target_parameters", lambda d: edit_config(d, target_parameters=["experts.down_proj"]),
     r"cannot honour target_parameters"),
    ("layers_to_transform-fewer", lambda d: edit_config(d, layers_to_transform=[0]), r"unexpected keys"),
    ("rank_pattern-other-r", lambda d: edit_config(d, rank_pattern={"c_attn": 8}), r"has shape"),
    ("rank_pattern-zero", lambda d: edit_config(d, rank_pattern={"c_attn": 0}), r"rank_pattern\['c_attn'\] must be"),
    ("alpha_pattern-string", lambda d: edit_config(d, alpha_pattern={"c_attn": "8"}), r"alpha_pattern\['c_attn'\]"),
    ("lora_bias-without-tensors", lambda d: edit_config(d, lora_bias=True), r"missing keys \[.*lora_B\.default\.bias"),
    ("pissa", lambda d: edit_config(d, init_lora_weights="pissa"), r"init_lora_weights='pissa'.*change the base"),
    ("negative-r", lambda d: edit_config(d, r=-1), r"adapter_config\.json: r must be a positive int"),
    ("string-alpha", lambda d: edit_config(d, lora_alpha="8"), r"lora_alpha must be a positive number"),
    ("huge-alpha", lambda d: edit_config(d, lora_alpha=10**400), r"adapter_config\.json: "),
    ("bad-bias", lambda d: edit_config(d, bias="some"), r"bias must be one of"),
    ("targets-absent", lambda d: edit_config(d, target_modules=["q_proj", "v_proj"]),
     r"adapter_config\.json: .*target_modules=\['q_proj', 'v_proj'\] matches no module"),
    ("targets-not-linear", lambda d: edit_config(d, target_modules=["ln_1"]), r"is a LayerNorm"),
    ("r-differs-from-tensors", lambda d: edit_config(d, r=8), r"adapter_config\.json says r=8 but "
                                                             r".*lora_[AB]\.default\.weight has shape \(\d+, \d+\), i\.e\. r=4"),
    ("key-missing", lambda d: edit_weights(d, lambda t: t.pop(B1)),
     r"missing keys \[transformer\.h\.1\.attn\.c_attn\.lora_B\.default\.weight\], unexpected keys \[none\]"),
    ("key-unexpected", lambda d: edit_weights(d, _set(PEFT_PREFIX + "transformer.h.0.mlp.c_fc.lora_A.weight",
                                                      torch.zeros(4, 32))),
     r"unexpected keys \[transformer\.h\.0\.mlp\.c_fc\.lora_A\.default\.weight\]"),
    ("shape", lambda d: edit_weights(d, _set(A0, torch.zeros(4, 31))), r"has shape \(4, 31\) but this model needs"),
    ("nan", lambda d: edit_weights(d, _set(A0, torch.full((4, 32), math.nan))), r"NaN or inf"),
    ("integers", lambda d: edit_weights(d, _set(A0, torch.zeros(4, 32, dtype=torch.int32))),
     r"holds torch\.int32; adapters hold float16, bfloat16, float32 or float64"),
]


@pytest.mark.parametrize("spoil, message", [case[1:] for case in BAD_DIRECTORIES],
                         ids=[case[0] for case in BAD_DIRECTORIES])
def test_bad_adapter_directory(spoil, message, adapter, tiny_gpt2, unchanged):
    spoil(adapter)
    check = unchanged(tiny_gpt2)
    with pytest.raises(MiniLoraError, match=message):
        minilora.load_adapter(tiny_gpt2, adapter)
    check()


@pytest.mark.parametrize("spoil, message", [case[1:] for case in BAD_DIRECTORIES if case[0] in
                                            ("key-missing", "shape", "use_dora", "json-invalid", "nan")],
                         ids=["key-missing", "shape", "use_dora", "json-invalid", "nan"])
def test_bad_adapter_into_existing_layers(spoil, message, adapter, tiny_gpt2, unchanged):
    """The same checks when the model already has minilora layers: they keep their weights."""
    minilora.inject(tiny_gpt2, CONFIG)
    randomize_adapters(tiny_gpt2, seed=9)
    spoil(adapter)
    check = unchanged(tiny_gpt2)
    with pytest.raises(MiniLoraError, match=message):
        minilora.load_adapter(tiny_gpt2, adapter)
    check()


@pytest.mark.parametrize("source, message", [
    ("missing", r"Adapter directory .*missing does not exist"),
    ("file", r"(?s)is a file; load_adapter reads the directory.*torch\.save\(model\)"),
    (42, r"needs an adapter directory \(a str or Path\) or a dict of tensors, got int"),
    (nn.Linear(2, 2), r"(?s)got a whole model \(Linear\).*minilora\.save_adapter.*load_state_dict"),
], ids=["missing", "file", "int", "module"])
def test_bad_source(source, message, adapter, tiny_gpt2, unchanged):
    if source == "missing":
        source = adapter.parent / "missing"
    elif source == "file":
        source = adapter / WEIGHTS_NAME
    check = unchanged(tiny_gpt2)
    with pytest.raises(MiniLoraError, match=message):
        minilora.load_adapter(tiny_gpt2, source)
    check()


def test_other_architecture(adapter, unchanged):
    """A GPT-2 of another width has the same layer names but other shapes."""
    from transformers import GPT2Config, GPT2LMHeadModel

    wider = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=48, n_head=2, n_positions=32, vocab_size=64,
                                              bos_token_id=63, eos_token_id=63)).eval()
    check = unchanged(wider)
    with pytest.raises(MiniLoraError, match=r"needs \(4, 48\)\. The adapter was saved from another model"):
        minilora.load_adapter(wider, adapter)
    check()


def test_existing_layers_of_another_rank(adapter, tiny_gpt2, unchanged):
    minilora.inject(tiny_gpt2, minilora.LoraConfig(r=2, target_modules=["c_attn"]))
    check = unchanged(tiny_gpt2)
    with pytest.raises(MiniLoraError, match=r"has r=4 .* this model's layers have another r.*minilora\.unload"):
        minilora.load_adapter(tiny_gpt2, adapter)
    check()


def test_existing_layers_elsewhere(adapter, tiny_gpt2, unchanged):
    minilora.inject(tiny_gpt2, minilora.LoraConfig(r=4, target_modules=["c_fc"]))
    check = unchanged(tiny_gpt2)
    with pytest.raises(MiniLoraError, match=r"missing keys .*c_fc.* unexpected keys .*c_attn.*fresh base model"):
        minilora.load_adapter(tiny_gpt2, adapter)
    check()


def test_merged_layers(adapter, tiny_gpt2, unchanged):
    minilora.inject(tiny_gpt2, CONFIG)
    minilora.merge(tiny_gpt2)
    check = unchanged(tiny_gpt2)
    with pytest.raises(MiniLoraError, match=r"are merged .* minilora\.unmerge"):
        minilora.load_adapter(tiny_gpt2, adapter)
    check()


def test_state_dict_without_layers(tiny_gpt2, unchanged):
    check = unchanged(tiny_gpt2)
    with pytest.raises(MiniLoraError, match=r"carries no config .* Pass the adapter directory"):
        minilora.load_adapter(tiny_gpt2, {A0: torch.zeros(4, 32)})
    check()


def test_whole_state_dict_is_not_an_adapter(tiny_gpt2, unchanged):
    minilora.inject(tiny_gpt2, CONFIG)
    check = unchanged(tiny_gpt2)
    with pytest.raises(MiniLoraError, match=r"(?s)looks like a whole model's state dict.*load_state_dict"):
        minilora.load_adapter(tiny_gpt2, {**tiny_gpt2.state_dict(), "extra.weight": torch.zeros(1)})
    check()


def test_model_argument_must_be_a_module(adapter):
    with pytest.raises(MiniLoraError, match=r"needs the model \(an nn\.Module\) first, got PosixPath|WindowsPath"):
        minilora.load_adapter(adapter, adapter)


def test_save_errors(tiny_gpt2, tmp_path, unchanged):
    with pytest.raises(MiniLoraError, match=r"needs a model with minilora layers"):
        minilora.save_adapter(tiny_gpt2, tmp_path / "a")
    minilora.inject(tiny_gpt2, CONFIG)
    (tmp_path / "file").write_text("")
    with pytest.raises(MiniLoraError, match=r"is a file; save_adapter writes a directory"):
        minilora.save_adapter(tiny_gpt2, tmp_path / "file")
    layer = tiny_gpt2.get_submodule("transformer.h.1.attn.c_attn")
    layer.scaling["default"] = 7.0  # edited by hand: no longer one config for all layers
    with pytest.raises(MiniLoraError, match=r"'transformer\.h\.1\.attn\.c_attn' has r=4, scaling=7"):
        minilora.save_adapter(tiny_gpt2, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# --------------------------------------------------------------------------------------------
# Fuzz: corrupted files fail cleanly or load exactly what is in them
# --------------------------------------------------------------------------------------------
def _tiny_linear() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()


PRINTABLE = bytes(range(32, 127))  # in JSON, printable garbage gets past the parser more often


def _corruptions(data: bytes, region: tuple[int, int], alphabet: bytes, rng: random.Random, count: int):
    """``count`` truncations, and ``count`` copies with 1 to 3 bytes within region overwritten from alphabet."""
    for _ in range(count):
        yield f"truncated at {(cut := rng.randrange(len(data)))}", data[:cut]
    for _ in range(count):
        spoiled = bytearray(data)
        offsets = [rng.randrange(*region) for _ in range(rng.randint(1, 3))]
        for offset in offsets:
            spoiled[offset] = rng.choice(alphabet)
        yield f"bytes overwritten at {offsets}", bytes(spoiled)


def _assert_loaded_what_is_in_the_files(model: nn.Module, directory: Path) -> None:
    """Read the files independently (json, safetensors / torch) and compare with the model."""
    fields = json.loads((directory / CONFIG_NAME).read_text(encoding="utf-8"))
    if (directory / WEIGHTS_NAME).exists():
        tensors = load_file(directory / WEIGHTS_NAME)
    else:
        tensors = torch.load(directory / LEGACY_WEIGHTS_NAME, weights_only=True)
    state = model.state_dict()
    for key, value in tensors.items():
        in_memory = key.removeprefix(PEFT_PREFIX).replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")
        assert torch.equal(state[in_memory], value.to(torch.float32)), key
    r, alpha = fields.get("r", 8), fields.get("lora_alpha", 8)
    scaling = alpha / (math.sqrt(r) if fields.get("use_rslora", False) else r)
    for _, layer in minilora.lora_layers(model):
        assert layer.r == {"default": r} and layer.scaling["default"] == pytest.approx(scaling, rel=1e-12)


def test_fuzzed_files_fail_cleanly_or_load_exactly(tmp_path, unchanged):
    trained = _tiny_linear()
    minilora.inject(trained, minilora.LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"]))
    randomize_adapters(trained, seed=2)
    minilora.save_adapter(trained, tmp_path / "st")
    minilora.save_adapter(trained, tmp_path / "bin", safe_serialization=False)

    rng = random.Random(20240601)
    cases = []
    for kind, name in (("st", WEIGHTS_NAME), ("bin", LEGACY_WEIGHTS_NAME), ("st", CONFIG_NAME)):
        data = (tmp_path / kind / name).read_bytes()
        if name == WEIGHTS_NAME:  # 8-byte length, then the JSON header, then the data
            header_end = 8 + int.from_bytes(data[:8], "little")
            regions = [((0, header_end), PRINTABLE), ((header_end, len(data)), bytes(range(256)))]
        elif name == CONFIG_NAME:
            regions = [((0, len(data)), PRINTABLE), ((0, len(data)), bytes(range(256)))]
        else:
            regions = [((0, len(data)), bytes(range(256)))]
        for region, alphabet in regions:
            cases += [(kind, name, label, spoiled) for label, spoiled in _corruptions(data, region, alphabet, rng, 24)]

    model, failures, loads = _tiny_linear(), 0, 0
    for number, (kind, name, label, spoiled) in enumerate(cases):
        directory = tmp_path / f"case{number}"
        directory.mkdir()
        for original in (tmp_path / kind).iterdir():
            (directory / original.name).write_bytes(spoiled if original.name == name else original.read_bytes())
        check = unchanged(model)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # e.g. an unknown field after a renamed key
                minilora.load_adapter(model, directory)
        except MiniLoraError:
            failures += 1
            check()  # a failed load changed nothing
        else:
            loads += 1
            _assert_loaded_what_is_in_the_files(model, directory)
            model = _tiny_linear()
    print(f"{len(cases)} corrupted files: {failures} clean failures, {loads} loads of what the file holds")
    assert failures + loads == len(cases) and failures >= len(cases) // 2
