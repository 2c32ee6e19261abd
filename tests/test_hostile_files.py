"""Hostile adapter files, read by every loader, with PEFT as the oracle.

A corpus of spoiled adapter directories (safetensors headers that lie, truncated and empty files,
directories and symlinks where files should be, pickles that would run code, tensors of the wrong
shape, key or dtype, NaN, hostile adapter_config.json values) is read by each way minilora reads a
file: ``minilora.load_adapter`` into a plain model, into existing layers and as a second adapter,
``minilora.compat.PeftModel.from_pretrained``, ``PeftModel.load_adapter``, ``LoraConfig.from_pretrained``
and the ``minilora`` command. For each case and each reader the rule is:

- PEFT raises (or loads with missing / unexpected keys, i.e. not the file's adapter): minilora raises
  MiniLoraError;
- minilora raises: a MiniLoraError that names the problem, and nothing changed: every parameter and
  buffer bitwise, requires_grad, each module's train/eval mode, the adapters and the active ones, the
  configs, and the files on disk;
- minilora loads: PEFT loads the same files without complaint, and the outputs are bitwise PEFT's.

Each case also pins what minilora does ("load" or the words of its refusal), so that a loader that
starts refusing good files fails here too. A hostile file never runs code: the pickle cases check that
their payload did not run.
"""

from __future__ import annotations

import copy
import json
import math
import os
import pickle
import shutil
import struct
import warnings
from pathlib import Path

import hypothesis.strategies as st
import peft
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from safetensors.torch import load_file, save_file
from torch import nn

import minilora
from minilora import MiniLoraError
from minilora.adapters import CONFIG_NAME, LEGACY_WEIGHTS_NAME, PEFT_PREFIX, WEIGHTS_NAME
from minilora.compat import LoraConfig as CompatLoraConfig
from minilora.compat import PeftModel as CompatPeftModel
from parity.twins import randomize_adapters

from disk import files_state

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = minilora.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"])
INPUT = torch.arange(12).reshape(2, 6)
A0 = PEFT_PREFIX + "transformer.h.0.attn.c_attn.lora_A.weight"
B0 = PEFT_PREFIX + "transformer.h.0.attn.c_attn.lora_B.weight"
MARKER = "MINILORA_HOSTILE_MARKER"  # the path a pickle payload would create


# --------------------------------------------------------------------------------------------
# The good adapter, and ways to spoil it
# --------------------------------------------------------------------------------------------
@pytest.fixture
def good(tiny_gpt2, tmp_path) -> Path:
    """A trained-looking adapter in PEFT's exact format: minilora's files without minilora's config
    digest (tests/test_adapters.py shows they are otherwise PEFT's), so that a config edited here is
    read as PEFT would read it rather than refused as not the one the weights were saved with."""
    trained = copy.deepcopy(tiny_gpt2)
    minilora.inject(trained, CONFIG)
    randomize_adapters(trained, seed=1)
    directory = tmp_path / "good"
    minilora.save_adapter(trained, directory)
    save_file(load_file(directory / WEIGHTS_NAME), directory / WEIGHTS_NAME, metadata={"format": "pt"})
    return directory


def safetensors_bytes(header: object, data: bytes, length: int | None = None) -> bytes:
    """A safetensors file: 8-byte little-endian header length, the JSON header, the data."""
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + data


def split_safetensors(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + size]), raw[8 + size:]


def edit_header(change):
    def spoil(d: Path) -> None:
        header, data = split_safetensors(d / WEIGHTS_NAME)
        change(header)
        (d / WEIGHTS_NAME).write_bytes(safetensors_bytes(header, data))
    return spoil


def sparse_tensor(key: str, shape: list[int]):
    """The file with ``key`` declared as a float32 tensor of ``shape`` whose bytes are a hole (a sparse file:
    nothing on disk), every other tensor's bytes as they were: a valid header over gigabytes of data."""
    def spoil(d: Path) -> None:
        header, data = split_safetensors(d / WEIGHTS_NAME)
        entries, start = {"__metadata__": header.pop("__metadata__", {"format": "pt"})}, 0
        placed = []
        for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"]):
            begin, end = entry["data_offsets"]
            size = math.prod(shape) * 4 if name == key else end - begin
            entries[name] = {**entry, **({"dtype": "F32", "shape": shape} if name == key else {}),
                             "data_offsets": [start, start + size]}
            placed.append((start, None if name == key else data[begin:end]))
            start += size
        text = json.dumps(entries).encode()
        with open(d / WEIGHTS_NAME, "wb") as file:
            file.write(struct.pack("<Q", len(text)) + text)
            file.truncate(8 + len(text) + start)
            for offset, values in placed:
                if values is not None:
                    file.seek(8 + len(text) + offset)
                    file.write(values)
    return spoil


def edit_weights(change):
    def spoil(d: Path) -> None:
        tensors = load_file(d / WEIGHTS_NAME)
        change(tensors)
        save_file(tensors, d / WEIGHTS_NAME, metadata={"format": "pt"})
    return spoil


def edit_config(**changes):
    def spoil(d: Path) -> None:
        fields = json.loads((d / CONFIG_NAME).read_text())
        fields.update(changes)
        (d / CONFIG_NAME).write_text(json.dumps(fields))
    return spoil


def write(name: str, data: bytes):
    return lambda d: (d / name).write_bytes(data)


def replace_by_dir(name: str):
    return lambda d: ((d / name).unlink(), (d / name).mkdir())


def replace_by_symlink(name: str, target: str):
    return lambda d: ((d / name).unlink(), (d / name).symlink_to(target))


def moved_outside(d: Path) -> None:
    """The weights live outside the folder, as in the Hugging Face cache (snapshots/ -> blobs/)."""
    outside = d.parent / f"{d.name}-blob"
    shutil.move(d / WEIGHTS_NAME, outside)
    (d / WEIGHTS_NAME).symlink_to(outside)


class RunsCode:
    """A pickle whose loading would create MARKER (by calling open)."""

    def __reduce__(self):
        return (open, (os.environ[MARKER], "w"))


def pickled_bin(save):
    def spoil(d: Path) -> None:
        tensors = dict(load_file(d / WEIGHTS_NAME))
        (d / WEIGHTS_NAME).unlink()
        tensors["payload"] = RunsCode()
        with open(d / LEGACY_WEIGHTS_NAME, "wb") as file:
            save(tensors, file)
    return spoil


def as_bin(d: Path) -> None:
    tensors = load_file(d / WEIGHTS_NAME)
    (d / WEIGHTS_NAME).unlink()
    torch.save(tensors, d / LEGACY_WEIGHTS_NAME)


def rename_keys(rename):
    return edit_weights(lambda t: [t.__setitem__(rename(key), t.pop(key)) for key in list(t)])


def all_to(dtype):
    return edit_weights(lambda t: [t.__setitem__(key, value.to(dtype)) for key, value in list(t.items())])


def duplicate_key_in_header(d: Path) -> None:
    """The same tensor name twice in the JSON header (JSON readers keep the last)."""
    header, data = split_safetensors(d / WEIGHTS_NAME)
    entry = json.dumps({A0: header[A0]})[1:-1]
    text = ("{" + entry + ", " + json.dumps(header)[1:]).encode()
    (d / WEIGHTS_NAME).write_bytes(struct.pack("<Q", len(text)) + text + data)


def header_text_replaced(old: str, new: str):
    """The header's JSON text with its first ``old`` replaced by ``new`` (e.g. a field written twice)."""
    def spoil(d: Path) -> None:
        header, data = split_safetensors(d / WEIGHTS_NAME)
        text = json.dumps(header)
        assert old in text
        text = text.replace(old, new, 1).encode()
        (d / WEIGHTS_NAME).write_bytes(struct.pack("<Q", len(text)) + text + data)
    return spoil


def overlapping(header: dict) -> None:
    names = sorted(key for key in header if key != "__metadata__")
    header[names[1]]["data_offsets"] = header[names[0]]["data_offsets"]


def bin_holding(change):
    """adapter_model.bin (torch.save) in place of the safetensors file, its dict changed by ``change``."""
    def spoil(d: Path) -> None:
        tensors = change(dict(load_file(d / WEIGHTS_NAME)))
        (d / WEIGHTS_NAME).unlink()
        torch.save(tensors, d / LEGACY_WEIGHTS_NAME)
    return spoil


def config_text_replaced(old: str, new: str):
    def spoil(d: Path) -> None:
        text = (d / CONFIG_NAME).read_text()
        assert old in text
        (d / CONFIG_NAME).write_text(text.replace(old, new))
    return spoil


def catastrophic_regex(d: Path) -> None:
    edit_config(target_modules="(" * 30 + "a" + ")*" * 30 + "$")(d)


LOAD = "load"
NOT_READ = r"could not be read .*(truncated or corrupt|save the adapter again)"
# (id, how to spoil the good adapter, "load" or the words of minilora's refusal)
CASES = [
    # safetensors headers that lie
    ("header-length-past-the-end", lambda d: (d / WEIGHTS_NAME).write_bytes(
        struct.pack("<Q", 10**12) + (d / WEIGHTS_NAME).read_bytes()[8:]), NOT_READ),
    ("header-length-zero", lambda d: (d / WEIGHTS_NAME).write_bytes(
        struct.pack("<Q", 0) + (d / WEIGHTS_NAME).read_bytes()[8:]), NOT_READ),
    ("header-not-json", write(WEIGHTS_NAME, struct.pack("<Q", 5) + b"nope!"), NOT_READ),
    ("header-a-list", write(WEIGHTS_NAME, safetensors_bytes([1, 2], b"")), NOT_READ),
    ("offsets-out-of-range", edit_header(lambda h: h[A0]["data_offsets"].__setitem__(1, 10**6)), NOT_READ),
    ("offsets-overlapping", edit_header(overlapping), NOT_READ),
    ("offsets-negative", edit_header(lambda h: h[A0].__setitem__("data_offsets", [-8, 8])), NOT_READ),
    ("duplicate-key", duplicate_key_in_header, LOAD),
    ("duplicate-field-in-an-entry", header_text_replaced('"dtype": "F32"', '"dtype": "F32", "dtype": "F32"'), NOT_READ),
    ("metadata-twice", header_text_replaced('"__metadata__": {"format": "pt"}',
                                            '"__metadata__": {"format": "pt"}, "__metadata__": {"format": "pt"}'), NOT_READ),
    ("metadata-key-twice", header_text_replaced('{"format": "pt"}', '{"format": "np", "format": "pt"}'), LOAD),
    ("unknown-dtype", edit_header(lambda h: h[A0].__setitem__("dtype", "Q7")), NOT_READ),
    ("dtype-size-mismatch", edit_header(lambda h: h[A0].__setitem__("dtype", "F16")), NOT_READ),
    ("negative-dim", edit_header(lambda h: h[A0].__setitem__("shape", [-4, 32])), NOT_READ),
    ("huge-dims", edit_header(lambda h: h[A0].__setitem__("shape", [2**62, 2**62])), NOT_READ),
    ("metadata-a-list", edit_header(lambda h: h.__setitem__("__metadata__", [1, 2])), NOT_READ),
    ("metadata-not-strings", edit_header(lambda h: h.__setitem__("__metadata__", {"format": 5})), NOT_READ),
    ("metadata-absent", edit_header(lambda h: h.pop("__metadata__")), LOAD),
    ("metadata-format-np", edit_header(lambda h: h["__metadata__"].__setitem__("format", "np")), LOAD),
    ("header-length-2**64-1", lambda d: (d / WEIGHTS_NAME).write_bytes(
        struct.pack("<Q", 2**64 - 1) + (d / WEIGHTS_NAME).read_bytes()[8:]), NOT_READ),
    ("offsets-reversed", edit_header(lambda h: h[A0].__setitem__("data_offsets", h[A0]["data_offsets"][::-1])),
     NOT_READ),
    ("shape-product-overflows", edit_header(lambda h: h[A0].__setitem__("shape", [2**32, 2**32, 0])), NOT_READ),
    ("dtype-not-a-string", edit_header(lambda h: h[A0].__setitem__("dtype", 5)), NOT_READ),
    ("bytes-after-the-last-tensor", lambda d: (d / WEIGHTS_NAME).write_bytes(
        (d / WEIGHTS_NAME).read_bytes() + bytes(64)), NOT_READ),
    ("sparse-64-MiB-A-of-another-shape", sparse_tensor(A0, [4, 2**22]),  # (refused from the header: never read)
     r"lora_A\.default\.weight has shape \(4, 4194304\) but this model needs \(4, 32\)"),
    ("metadata-digest-of-another-config", edit_header(
        lambda h: h["__metadata__"].__setitem__("minilora_config_sha256", "0" * 64)), r"is not the config .* saved with"),
    # truncated, empty, absent, not a file
    ("weights-truncated", lambda d: (d / WEIGHTS_NAME).write_bytes((d / WEIGHTS_NAME).read_bytes()[:-5]), NOT_READ),
    ("weights-empty", write(WEIGHTS_NAME, b""), NOT_READ),
    ("config-empty", write(CONFIG_NAME, b""), r"is not valid JSON"),
    ("weights-a-directory", replace_by_dir(WEIGHTS_NAME), r"is a directory, not a file"),
    ("config-a-directory", replace_by_dir(CONFIG_NAME), r"is a directory, not a file"),
    ("weights-symlink-outside-the-folder", moved_outside, LOAD),
    ("weights-symlink-to-dev-zero", replace_by_symlink(WEIGHTS_NAME, "/dev/zero"), r"not a regular file"),
    ("config-symlink-to-dev-zero", replace_by_symlink(CONFIG_NAME, "/dev/zero"), r"not a regular file"),
    ("weights-symlink-dangling", replace_by_symlink(WEIGHTS_NAME, "/nonexistent/minilora"), r"has no adapter_model"),
    ("weights-symlink-loop", lambda d: ((d / WEIGHTS_NAME).unlink(), (d / WEIGHTS_NAME).symlink_to(d / WEIGHTS_NAME)),
     r"has no adapter_model"),
    ("config-symlink-loop", lambda d: ((d / CONFIG_NAME).unlink(), (d / CONFIG_NAME).symlink_to(d / CONFIG_NAME)),
     r"adapter_config\.json is a symlink that leads nowhere"),
    ("config-symlink-dangling", replace_by_symlink(CONFIG_NAME, "/nonexistent/minilora"),
     r"adapter_config\.json is a symlink that leads nowhere \(to '/nonexistent/minilora'"),
    # pickles (adapter_model.bin)
    ("bin", as_bin, LOAD),
    ("bin-pickle-that-runs-code", pickled_bin(pickle.dump), r"adapter_model\.bin could not be read"),
    ("bin-torch-save-that-runs-code", pickled_bin(torch.save), r"adapter_model\.bin could not be read"),
    ("bin-garbage-next-to-safetensors", write(LEGACY_WEIGHTS_NAME, b"junk"), LOAD),  # (both prefer safetensors)
    ("bin-empty", lambda d: ((d / WEIGHTS_NAME).unlink(), (d / LEGACY_WEIGHTS_NAME).write_bytes(b"")),
     r"adapter_model\.bin could not be read"),
    ("bin-keys-not-strings", bin_holding(lambda t: {i: value for i, value in enumerate(t.values())}),
     r"adapter_model\.bin is not a dict of named tensors"),
    ("bin-a-dict-of-dicts", bin_holding(lambda t: {"state_dict": t}), r"adapter_model\.bin is not a dict of named"),
    ("bin-meta-tensor", bin_holding(lambda t: {**t, A0: torch.empty(4, 32, device="meta")}),
     r"adapter_model\.bin could not be read"),
    ("bin-sparse-tensor", bin_holding(lambda t: {**t, A0: t[A0].to_sparse()}), r"lora_A\.weight is a torch\.sparse_coo "
     r"tensor; adapters hold dense tensors"),
    # tensors that do not fit the model
    ("A-transposed", edit_weights(lambda t: t.__setitem__(A0, t[A0].T.contiguous())), r"i\.e\. r=32"),
    ("B-transposed", edit_weights(lambda t: t.__setitem__(B0, t[B0].T.contiguous())), r"i\.e\. r=96"),
    ("r-2-with-config-r-4", edit_weights(lambda t: [t.__setitem__(k, (v[:2] if ".lora_A." in k else v[:, :2])
                                                                   .contiguous()) for k, v in list(t.items())]),
     r"says r=4 but .* i\.e\. r=2"),
    ("key-missing", edit_weights(lambda t: t.pop(A0)), r"missing keys \[transformer\.h\.0\.attn\.c_attn\.lora_A"),
    ("key-a-base-weight", edit_weights(  # (PEFT loads it into the base model: strict=False)
        lambda t: t.__setitem__(PEFT_PREFIX + "transformer.h.0.mlp.c_fc.weight", torch.zeros(32, 128))),
     r"unexpected keys \[transformer\.h\.0\.mlp\.c_fc\.weight\]"),
    ("key-extra", edit_weights(lambda t: t.__setitem__(PEFT_PREFIX + "junk", torch.zeros(1))), r"unexpected keys \[junk\]"),
    ("key-of-an-embedding-adapter", edit_weights(
        lambda t: t.__setitem__(PEFT_PREFIX + "transformer.wte.lora_embedding_A", torch.zeros(4, 64))),
     r"unexpected keys \[transformer\.wte\.lora_embedding_A\]"),
    ("keys-without-prefix", rename_keys(lambda k: k.removeprefix(PEFT_PREFIX)), r"do not start with 'base_model\.model\.'"),
    ("keys-of-another-model", rename_keys(lambda k: PEFT_PREFIX + "model." + k.removeprefix(PEFT_PREFIX)),
     r"missing keys .* unexpected keys \[model\.transformer"),
    ("keys-naming-adapter-other", rename_keys(lambda k: k.replace(".lora_A.", ".lora_A.other.")),
     r"names the adapter 'other', but it is being loaded as"),
    ("nan", edit_weights(lambda t: t[A0].__setitem__((0, 0), math.nan)), r"NaN or inf"),
    ("inf", edit_weights(lambda t: t[B0].__setitem__((0, 0), -math.inf)), r"NaN or inf"),
    ("float16", all_to(torch.float16), LOAD),
    ("bfloat16", all_to(torch.bfloat16), LOAD),
    ("float64", all_to(torch.float64), LOAD),
    ("int8", edit_weights(lambda t: t.__setitem__(A0, t[A0].to(torch.int8))), r"holds torch\.int8"),
    ("bool", edit_weights(lambda t: t.__setitem__(A0, t[A0] > 0)), r"holds torch\.bool"),
    ("complex", edit_weights(lambda t: t.__setitem__(A0, t[A0].to(torch.complex64))), r"holds torch\.complex64"),
    # adapter_config.json
    ("config-a-list", write(CONFIG_NAME, b"[]"), r"holds a JSON list"),
    ("config-null", write(CONFIG_NAME, b"null"), r"holds a JSON null"),
    ("config-nesting", write(CONFIG_NAME, b"[" * 100000 + b"]" * 100000), r"nests JSON values too deeply"),
    ("config-nesting-in-a-field", config_text_replaced('"bias": "none"', '"bias": "none", "x": ' + "[" * 10000
                                                       + "]" * 10000), r"nests JSON values too deeply"),
    ("config-not-utf8", write(CONFIG_NAME, b'{"peft_type": "LORA", "r": 4, "x": "\xff"}'), r"is not valid JSON"),
    ("config-utf8-bom", lambda d: (d / CONFIG_NAME).write_bytes(b"\xef\xbb\xbf" + (d / CONFIG_NAME).read_bytes()),
     r"is not valid JSON"),
    ("config-over-64-MiB", lambda d: os.truncate(d / CONFIG_NAME, 64 * 2**20 + 1),  # (sparse: nothing written)
     r"adapter_config\.json holds more than 64 MiB, more than any config PEFT writes"),
    ("config-integer-of-5000-digits", config_text_replaced('"r": 4', '"r": ' + "4" * 5000),
     r"could not be read as JSON \(Exceeds the limit \(4300 digits\)"),
    ("config-NaN-literal", lambda d: (d / CONFIG_NAME).write_text(
        (d / CONFIG_NAME).read_text().replace('"lora_alpha": 8', '"lora_alpha": NaN')), r"lora_alpha must be"),
    ("config-duplicate-field", lambda d: (d / CONFIG_NAME).write_text(
        (d / CONFIG_NAME).read_text().replace('"lora_alpha": 8', '"lora_alpha": 2, "lora_alpha": 16')), LOAD),
    ("r-string", edit_config(r="8"), r"r must be a positive int"),
    ("r-zero", edit_config(r=0), r"r must be a positive int"),
    ("r-negative", edit_config(r=-1), r"r must be a positive int"),
    ("r-huge", edit_config(r=10**9), r"r=1000000000"),
    ("r-float", edit_config(r=4.0), r"r must be a positive int"),
    ("r-bool", edit_config(r=True), r"r must be a positive int"),
    ("lora_alpha-inf", edit_config(lora_alpha=math.inf), r"lora_alpha must be"),
    ("lora_alpha-null", edit_config(lora_alpha=None), r"lora_alpha must be"),
    ("lora_alpha-zero", edit_config(lora_alpha=0), r"lora_alpha must be"),
    ("lora_alpha-beyond-float", edit_config(lora_alpha=10**400), r"lora_alpha must be a positive number \(finite as a "
     r"float\), got lora_alpha=1000"),
    ("alpha_pattern-beyond-float", edit_config(alpha_pattern={"c_attn": 10**400}),
     r"alpha_pattern\['c_attn'\] must be a positive number \(finite as a float\)"),
    ("target_modules-int", edit_config(target_modules=5), r"target_modules must be"),
    ("target_modules-list-of-int", edit_config(target_modules=[5]), r"target_modules"),
    ("target_modules-empty", edit_config(target_modules=[]), r"target_modules"),
    ("target_modules-object", edit_config(target_modules={"c_attn": 1}), r"target_modules"),
    ("target_modules-invalid-regex", edit_config(target_modules="[unclosed"), r"not a valid"),
    ("target_modules-catastrophic-regex", catastrophic_regex, r"regex|matches no module"),
    # (a counted repeat that the regex engine would unroll into gigabytes: found before it is compiled)
    ("target_modules-huge-repeat", edit_config(target_modules="(c_attn){1000000000}"), r"unrolls to about 6e\+09"),
    ("modules_to_save-huge-repeat", edit_config(modules_to_save=["((lm_head){1000}){1000}"]), r"unrolls to about 7e\+06"),
    ("target_modules-10000-nested-groups", edit_config(target_modules="(" * 5000 + "c_attn" + ")" * 5000),
     r"is not a valid one \(RecursionError"),
    ("peft_type-LOHA", edit_config(peft_type="LOHA"), r"peft_type is 'LOHA'"),
    ("peft_type-lowercase", edit_config(peft_type="lora"), r"peft_type is 'lora'"),
    ("peft_type-missing", lambda d: (d / CONFIG_NAME).write_text(json.dumps(
        {k: v for k, v in json.loads((d / CONFIG_NAME).read_text()).items() if k != "peft_type"})), r"missing required"),
    ("task_type-unknown", edit_config(task_type="NOPE"), r"Invalid task type: 'NOPE'"),
    ("task_type-int", edit_config(task_type=5), r"task_type must be a string or null"),
    ("inference_mode-string", edit_config(inference_mode="false"), r"inference_mode must be true/false"),
    ("lora_dropout-two", edit_config(lora_dropout=2.0), r"lora_dropout"),
    ("lora_dropout-negative", edit_config(lora_dropout=-0.1), r"lora_dropout"),
    ("bias-int", edit_config(bias=5), r"bias must be one of"),
    ("use_rslora-string", edit_config(use_rslora="yes"), r"use_rslora"),
    ("init_lora_weights-pissa", edit_config(init_lora_weights="pissa"), r"init_lora_weights='pissa'"),
    ("layers_to_transform-out-of-range", edit_config(layers_to_transform=[99]), r"layers_to_transform"),
    ("rank_pattern-a-list", edit_config(rank_pattern=[1]), r"rank_pattern"),
    ("alpha_pattern-catastrophic-key", edit_config(alpha_pattern={"(a+)+$": 4}), LOAD),  # (no name here makes it backtrack)
    ("modules_to_save-a-string", edit_config(modules_to_save="lm_head"), r"modules_to_save"),
    ("use_dora", edit_config(use_dora=True), r"cannot honour use_dora=True"),
    ("target_parameters", edit_config(target_parameters=["x"]), r"cannot honour target_parameters"),
    ("megatron_config", edit_config(megatron_config={"a": 1}), r"cannot honour megatron_config"),
    ("future-field", edit_config(a_field_of_peft_99={"x": 1}), LOAD),
    ("future-peft_version", edit_config(peft_version="99.0.0"), LOAD),
    ("runtime_config", edit_config(runtime_config={"ephemeral_gpu_offload": True}), LOAD),
]
IDS = [case[0] for case in CASES]


# --------------------------------------------------------------------------------------------
# What "nothing changed" means
# --------------------------------------------------------------------------------------------
def model_state(model: nn.Module) -> tuple:
    """Everything a failed load must leave as it was: every tensor bitwise (parameters and buffers,
    by state_dict and by object), requires_grad, each module's type and train/eval mode, each LoRA
    layer's adapters, active adapters, scaling and merged state, and the recorded configs."""
    layers = {name: (sorted(layer.lora_A), list(layer.active_adapters), dict(layer.scaling),
                     list(layer.merged_adapters), layer.disabled) for name, layer in minilora.lora_layers(model)}
    return ({key: value.detach().clone() for key, value in model.state_dict().items()},
            [(name, id(tensor)) for name, tensor in [*model.named_parameters(), *model.named_buffers()]],
            {name: p.requires_grad for name, p in model.named_parameters()},
            [(name, type(module), module.training) for name, module in model.named_modules()],
            layers, {name: id(config) for name, config in getattr(model, "minilora_configs", {}).items()})


def assert_same_state(before: tuple, after: tuple) -> None:
    assert before[0].keys() == after[0].keys(), "state_dict keys changed"
    changed = [key for key in before[0] if not torch.equal(before[0][key], after[0][key])]
    assert not changed, f"tensors changed: {changed[:4]}"
    for what, i in (("parameter objects", 1), ("requires_grad", 2), ("modules or train/eval modes", 3),
                    ("adapters / active / scaling / merged", 4), ("configs", 5)):
        assert before[i] == after[i], f"{what} changed"


# --------------------------------------------------------------------------------------------
# The readers: each returns (the model that was loaded into, the callable that gives logits)
# --------------------------------------------------------------------------------------------
def native(base, directory, good):
    model = copy.deepcopy(base)
    return model, lambda: minilora.load_adapter(model, directory)


def native_into_layers(base, directory, good):
    model = copy.deepcopy(base)
    minilora.inject(model, CONFIG)
    randomize_adapters(model, seed=5)
    return model, lambda: minilora.load_adapter(model, directory)


def native_second(base, directory, good):
    model = minilora.load_adapter(copy.deepcopy(base), good)

    def load():
        minilora.load_adapter(model, directory, adapter_name="other")
        minilora.set_adapter(model, "other")
        return model
    return model, load


def compat_from_pretrained(base, directory, good):
    model = copy.deepcopy(base)
    return model, lambda: CompatPeftModel.from_pretrained(model, str(directory))


def compat_load_adapter(base, directory, good):
    wrapper = CompatPeftModel.from_pretrained(copy.deepcopy(base), str(good))

    def load():
        wrapper.load_adapter(str(directory), "other")
        wrapper.set_adapter("other")
        return wrapper
    return wrapper.get_base_model(), load


READERS = {"native": native, "native-into-layers": native_into_layers, "native-second-adapter": native_second,
           "compat-from_pretrained": compat_from_pretrained, "compat-load_adapter": compat_load_adapter}


def peft_outcome(base, directory, good, second: bool):
    """PEFT's logits for the files, or None where it raises or does not load all of them."""
    model = copy.deepcopy(base)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if second:
                wrapper = peft.PeftModel.from_pretrained(model, str(good))
                wrapper.load_adapter(str(directory), "other")
                wrapper.set_adapter("other")
            else:
                wrapper = peft.PeftModel.from_pretrained(model, str(directory))
        if any("missing adapter keys" in str(w.message) for w in caught):
            return None  # PEFT left the adapter (partly) as initialised: not the file's adapter
        with torch.no_grad():
            return wrapper(INPUT).logits
    except Exception:
        return None


def check_reader(reader, base, directory, good, expect, peft_logits) -> str:
    """Run one reader on ``directory`` and check the rule in the module docstring. Returns "load" or "refuse"."""
    model, load = reader(base, directory, good)
    before, files_before = model_state(model), files_state(directory.parent)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = load()
    except MiniLoraError as error:
        assert_same_state(before, model_state(model))
        assert files_state(directory.parent) == files_before, "a failed load changed the files"
        assert expect != LOAD, f"refused a file PEFT loads: {error}"
        return "refuse"
    assert expect == LOAD, f"loaded a file that should be refused ({expect})"
    assert peft_logits is not None, "loaded a file that PEFT does not load"
    with torch.no_grad():
        logits = loaded(INPUT).logits
    assert torch.equal(logits, peft_logits), f"outputs differ from PEFT's by {(logits - peft_logits).abs().max()}"
    assert files_state(directory.parent) == files_before, "loading changed the files"
    return "load"


@pytest.fixture
def marker(tmp_path, monkeypatch):
    path = tmp_path / "payload-ran"
    monkeypatch.setenv(MARKER, str(path))
    yield path
    assert not path.exists(), "a hostile pickle ran code"


# Loaded as a second adapter named "other", these files are that adapter's (PEFT loads them too).
LOADS_AS_OTHER = {"keys-naming-adapter-other"}


@pytest.mark.parametrize("case, spoil, expect", CASES, ids=IDS)
def test_every_reader_refuses_cleanly_or_loads_what_peft_loads(case, spoil, expect, good, tiny_gpt2, tmp_path,
                                                                marker):
    directory = tmp_path / "case"
    directory.mkdir()
    shutil.copytree(good, directory / "adapter")
    directory = directory / "adapter"
    spoil(directory)
    peft_logits = {second: peft_outcome(tiny_gpt2, directory, good, second) for second in (False, True)}
    if expect == LOAD:
        assert peft_logits[False] is not None and peft_logits[True] is not None, "PEFT does not load this case"
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(MiniLoraError, match=expect):
                minilora.load_adapter(copy.deepcopy(tiny_gpt2), directory)
    for name, reader in READERS.items():
        second = name in ("native-second-adapter", "compat-load_adapter")
        check_reader(reader, tiny_gpt2, directory, good, LOAD if second and case in LOADS_AS_OTHER else expect,
                     peft_logits[second])


@pytest.mark.parametrize("spoil, expect", [case[1:] for case in CASES], ids=IDS)
def test_lora_config_from_pretrained(spoil, expect, good, tmp_path, marker):
    """``LoraConfig.from_pretrained`` reads the config only: a bad one is a MiniLoraError (PEFT's reader checks
    less: it may raise a bare error, or return a config that fails later); a good one gives PEFT's fields."""
    directory = tmp_path / "adapter"
    shutil.copytree(good, directory)
    spoil(directory)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ours = CompatLoraConfig.from_pretrained(str(directory))
        except MiniLoraError:
            assert expect != LOAD, "a config every loader reads was refused by LoraConfig.from_pretrained"
            return
        theirs = peft.LoraConfig.from_pretrained(str(directory))  # ours read it: so must PEFT
    for name in ("r", "lora_alpha", "lora_dropout", "bias", "use_rslora", "init_lora_weights", "task_type"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert set(ours.target_modules) == set(theirs.target_modules)


# --------------------------------------------------------------------------------------------
# Random safetensors headers: every dtype, shape and offset a header can claim
# --------------------------------------------------------------------------------------------
DTYPES = ["F32", "F16", "BF16", "F64", "I8", "U8", "I32", "I64", "BOOL", "F8_E4M3", "C64", "Q7", "", 5]


@st.composite
def headers(draw):
    """The good file's header with one to three entries' dtype, shape or offsets rewritten."""
    edits = draw(st.lists(st.tuples(st.sampled_from(["A0", "B0"]),
                                    st.sampled_from(["dtype", "shape", "data_offsets"]),
                                    st.one_of(st.sampled_from(DTYPES),
                                              st.lists(st.integers(-2, 2**40), min_size=0, max_size=3))),
                          min_size=1, max_size=3))
    return edits


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=40)
@given(edits=headers())
def test_random_headers_fail_cleanly_or_load_what_peft_loads(edits, good, tiny_gpt2, tmp_path_factory, marker):
    directory = tmp_path_factory.mktemp("header") / "adapter"
    shutil.copytree(good, directory)

    def change(header):
        for key, field, value in edits:
            header[{"A0": A0, "B0": B0}[key]][field] = value
    edit_header(change)(directory)
    peft_logits = peft_outcome(tiny_gpt2, directory, good, second=False)
    for reader in (native, compat_from_pretrained):
        model, load = reader(tiny_gpt2, directory, good)
        before = model_state(model)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loaded = load()
        except MiniLoraError:
            assert_same_state(before, model_state(model))
            continue
        assert peft_logits is not None, f"minilora loads a header PEFT does not: {edits}"
        with torch.no_grad():
            assert torch.equal(loaded(INPUT).logits, peft_logits)


# --------------------------------------------------------------------------------------------
# The minilora command on hostile files: one error line, status 2, nothing written
# --------------------------------------------------------------------------------------------
@pytest.fixture
def tiny_model_dir(tiny_gpt2, tmp_path) -> Path:
    tiny_gpt2.save_pretrained(tmp_path / "tiny-model")
    return tmp_path / "tiny-model"


CLI_CASES = ["weights-truncated", "header-length-past-the-end", "bin-pickle-that-runs-code", "keys-naming-adapter-other",
             "nan", "config-a-list", "r-huge", "task_type-unknown", "target_modules-catastrophic-regex",
             "weights-symlink-to-dev-zero", "config-a-directory", "target_modules-huge-repeat", "bin-sparse-tensor"]


@pytest.mark.parametrize("command", ["merge", "diff"])
@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_on_hostile_files(case, command, good, tiny_model_dir, tmp_path, capsys, marker):
    from minilora import cli

    spoil, expect = {c[0]: c[1:] for c in CASES}[case]
    directory = tmp_path / "adapter"
    shutil.copytree(good, directory)
    spoil(directory)
    before = files_state(tmp_path)
    argv = [command, str(directory), *([str(tmp_path / "merged")] if command == "merge" else []),
            "--model", str(tiny_model_dir)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        status = cli.main(argv)
    err = capsys.readouterr().err
    assert status == 2
    errors = [line for line in err.splitlines() if line.startswith("minilora: error:")]
    assert len(errors) == 1 and errors[0].count("\n") == 0, err
    assert files_state(tmp_path) == before, "the command wrote something"


@pytest.mark.parametrize("command", ["merge", "diff"])
def test_cli_on_a_config_of_64_gib(command, good, tiny_model_dir, tmp_path, capsys):
    """A sparse 64 GiB adapter_config.json (nothing on disk; not in the corpus, whose checks read every file):
    one error line from load_adapter's bounded read, not a MemoryError from the command reading it whole
    first (for its note about the adapter's base model)."""
    from minilora import cli

    directory = tmp_path / "adapter"
    shutil.copytree(good, directory)
    os.truncate(directory / CONFIG_NAME, 64 * 2**30)
    argv = [command, str(directory), *([str(tmp_path / "merged")] if command == "merge" else []),
            "--model", str(tiny_model_dir)]
    assert cli.main(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("minilora: error:")]
    assert len(errors) == 1 and "holds more than 64 MiB" in errors[0]
    assert not (tmp_path / "merged").exists()


# --------------------------------------------------------------------------------------------
# State dicts handed to set_peft_model_state_dict
# --------------------------------------------------------------------------------------------
def _wrapped(tiny_gpt2, library):
    import parity.twins as twins

    model = copy.deepcopy(tiny_gpt2)
    if library == "peft":
        return peft.get_peft_model(model, twins.peft_config(CONFIG))
    return minilora.compat.get_peft_model(model, CompatLoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"]))


STATE_DICT_CASES = [
    ("other-adapter-name", lambda t: {k.replace(".lora_A.", ".lora_A.other."): v for k, v in t.items()}),
    ("default-adapter-name", lambda t: {k.replace(".lora_A.", ".lora_A.default."): v for k, v in t.items()}),
    ("no-prefix", lambda t: {k.removeprefix(PEFT_PREFIX): v for k, v in t.items()}),
    ("wrong-shape", lambda t: {**t, A0: torch.zeros(4, 31)}),
    ("transposed", lambda t: {**t, A0: t[A0].T.contiguous()}),
    ("nan", lambda t: {**t, A0: torch.full_like(t[A0], math.nan)}),  # (PEFT loads NaN; minilora refuses it)
    ("missing", lambda t: {k: v for k, v in t.items() if k != A0}),
    ("extra", lambda t: {**t, PEFT_PREFIX + "junk.weight": torch.zeros(1)}),
    ("not-a-tensor", lambda t: {**t, A0: [[0.0] * 32] * 4}),
    ("integers", lambda t: {**t, A0: t[A0].to(torch.int64)}),
]


def _peft_loads_exactly(tiny_gpt2, tensors, wanted, adapter_name) -> bool:
    """Whether PEFT's set_peft_model_state_dict gives its adapter exactly ``wanted`` and reports no key."""
    theirs = _wrapped(tiny_gpt2, "peft")
    if adapter_name == "other":
        theirs.add_adapter("other", peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"]))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = peft.set_peft_model_state_dict(theirs, tensors, adapter_name=adapter_name)
    except Exception:
        return False
    got = peft.get_peft_model_state_dict(theirs, adapter_name=adapter_name)
    return not result.unexpected_keys and got.keys() == wanted.keys() and all(
        torch.equal(got[k], wanted[k]) for k in wanted)


@pytest.mark.parametrize("adapter_name", ["default", "other"])
@pytest.mark.parametrize("spoil", [case[1] for case in STATE_DICT_CASES], ids=[case[0] for case in STATE_DICT_CASES])
def test_set_peft_model_state_dict_loads_what_peft_loads_or_refuses(spoil, adapter_name, tiny_gpt2):
    """A dict PEFT loads exactly into the adapter, minilora loads exactly; any other (PEFT raises, reports
    missing or unexpected keys, or writes into another adapter) is a MiniLoraError with the model unchanged."""
    from minilora.compat import get_peft_model_state_dict, set_peft_model_state_dict

    source = _wrapped(tiny_gpt2, "minilora")
    randomize_adapters(source.get_base_model(), seed=3)
    wanted = get_peft_model_state_dict(source)
    tensors = spoil(dict(wanted))
    model = _wrapped(tiny_gpt2, "minilora")
    if adapter_name == "other":
        model.add_adapter("other", CompatLoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"]))
    before = model_state(model.get_base_model())
    if _peft_loads_exactly(tiny_gpt2, tensors, wanted, adapter_name):
        set_peft_model_state_dict(model, tensors, adapter_name=adapter_name)
        got = get_peft_model_state_dict(model, adapter_name=adapter_name)
        assert got.keys() == wanted.keys() and all(torch.equal(got[k], wanted[k]) for k in wanted)
    else:
        with pytest.raises(MiniLoraError):
            set_peft_model_state_dict(model, tensors, adapter_name=adapter_name)
        assert_same_state(before, model_state(model.get_base_model()))


def test_task_types_are_pefts():
    from minilora.adapter_config import TASK_TYPES
    from minilora.compat import TaskType

    assert TASK_TYPES == tuple(task.value for task in peft.TaskType) == tuple(task.value for task in TaskType)


# --------------------------------------------------------------------------------------------
# AutoPeftModel: the config also names the base model and the class that loads it
# --------------------------------------------------------------------------------------------
AUTO_CASES = [
    ("library-not-a-string", {"auto_mapping": {"base_model_class": "GPT2LMHeadModel", "parent_library": 5}},
     r"auto_mapping must name a library and a class"),
    ("class-not-a-string", {"auto_mapping": {"base_model_class": ["x"], "parent_library": "transformers"}},
     r"auto_mapping must name a library and a class"),
    ("no-such-class", {"auto_mapping": {"base_model_class": "NoSuchModel", "parent_library": "transformers"}},
     r"is not a model class"),
    ("a-function", {"auto_mapping": {"base_model_class": "pipeline", "parent_library": "transformers"}},
     r"is not a model class"),
    ("library-not-allowed", {"auto_mapping": {"base_model_class": "system", "parent_library": "os"}},
     r"not in the import allowlist"),
    ("base-model-missing", {"base_model_name_or_path": "/nonexistent/minilora-base"}, r"could not be loaded"),
    ("base-model-a-file", {"base_model_name_or_path": "__file__"}, r"could not be loaded"),
    ("task_type-unknown", {"task_type": "NOPE"}, r"Invalid task type"),
]


@pytest.mark.parametrize("fields, words", [case[1:] for case in AUTO_CASES], ids=[case[0] for case in AUTO_CASES])
def test_auto_peft_model_refuses_hostile_configs_as_peft_does(fields, words, good, tiny_gpt2, tmp_path):
    tiny_gpt2.save_pretrained(tmp_path / "base")
    changes = {"base_model_name_or_path": str(tmp_path / "base"), "task_type": None, **fields}
    if changes["base_model_name_or_path"] == "__file__":
        changes["base_model_name_or_path"] = str(good / CONFIG_NAME)
    directory = tmp_path / "adapter"
    shutil.copytree(good, directory)
    edit_config(**changes)(directory)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(Exception):
            peft.AutoPeftModel.from_pretrained(str(directory))
        with pytest.raises(MiniLoraError, match=words):
            minilora.compat.AutoPeftModel.from_pretrained(str(directory))


@pytest.mark.parametrize("fields", [{"target_modules": "x" * 90_000}, {"target_modules": ["x" * 10**6]},
                                    {"rank_pattern": {"c_attn": [[0] * 10**5]}}], ids=["regex", "names", "value"])
def test_a_huge_value_is_not_quoted_whole(fields, good, tiny_gpt2, tmp_path):
    """A megabyte-long value in adapter_config.json is refused with a message of a few thousand characters
    that still starts with the file and ends with what to do (MiniLoraError.MAX_MESSAGE)."""
    directory = tmp_path / "adapter"
    shutil.copytree(good, directory)
    edit_config(**fields)(directory)
    for reader in (native, compat_from_pretrained):
        model, load = reader(tiny_gpt2, directory, good)
        with pytest.raises(MiniLoraError) as error:
            load()
        message = str(error.value)
        assert len(message) < 4100 and "characters left out" in message, len(message)
        assert message.startswith(str(directory)) and message.rstrip().endswith(".")


@pytest.mark.parametrize("target", ["/dev/zero", "fifo", "directory"])
def test_config_readers_do_not_read_forever(tmp_path, target):
    """LoraConfig.from_json_file and from_pretrained on a device, a FIFO or a folder named like a config."""
    path = tmp_path / CONFIG_NAME
    if target == "fifo":
        os.mkfifo(path)
    elif target == "directory":
        path.mkdir()
    else:
        path.symlink_to(target)
    with pytest.raises(MiniLoraError, match=r"not a regular file|is a directory, not a file"):
        CompatLoraConfig.from_json_file(path)
    with pytest.raises(MiniLoraError, match=r"not a regular file|is a directory, not a file"):
        CompatLoraConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize("name", [WEIGHTS_NAME, LEGACY_WEIGHTS_NAME, CONFIG_NAME])
def test_a_fifo_in_place_of_a_file_is_refused_not_read(name, good, tiny_gpt2, tmp_path):
    """(Not in the PEFT-compared corpus: PEFT blocks forever reading a FIFO.)"""
    directory = tmp_path / "adapter"
    shutil.copytree(good, directory)
    if name == LEGACY_WEIGHTS_NAME:
        (directory / WEIGHTS_NAME).unlink()
    else:
        (directory / name).unlink()
    os.mkfifo(directory / name)
    for reader in (native, compat_from_pretrained):
        model, load = reader(tiny_gpt2, directory, good)
        before = model_state(model)
        with pytest.raises(MiniLoraError, match=r"is not a regular file"):
            load()
        assert_same_state(before, model_state(model))


# --------------------------------------------------------------------------------------------
# Weights of gigabytes, and weights that change while they are read (not in the corpus, whose checks
# read every file whole)
# --------------------------------------------------------------------------------------------
GIB_A = [4, 2**26]  # float32: 1 GiB


def peak_python_bytes(call) -> int:
    """The peak of the memory Python allocates (bytes read from files among it) while ``call()`` runs."""
    import tracemalloc

    tracemalloc.start()
    try:
        call()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


@pytest.mark.parametrize("reader", [native, native_into_layers, compat_from_pretrained, compat_load_adapter],
                         ids=["native", "native-into-layers", "compat-from_pretrained", "compat-load_adapter"])
def test_a_gigabyte_tensor_of_another_shape_is_refused_from_the_header(reader, good, tiny_gpt2, tmp_path):
    """A sparse file (nothing on disk) whose valid header declares lora_A as 1 GiB: PEFT memory-maps it and
    refuses the shape; minilora refuses it from the header, before reading any of its data."""
    directory = tmp_path / "adapter"
    shutil.copytree(good, directory)
    sparse_tensor(A0, GIB_A)(directory)
    assert peft_outcome(tiny_gpt2, directory, good, second=reader is compat_load_adapter) is None
    model, load = reader(tiny_gpt2, directory, good)
    before = model_state(model)

    def refused():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(MiniLoraError, match=r"has shape \(4, 67108864\) but this model needs \(4, 32\)"):
                load()
    assert peak_python_bytes(refused) < 2**24  # (the old read of the whole file: > 1 GiB)
    assert_same_state(before, model_state(model))


def test_a_gigabyte_tensor_peft_ignores_is_not_read(tiny_gpt2, tmp_path):
    """lm_head in modules_to_save: PEFT's loading ignores ``lm_head.modules_to_save.weight`` (saved_embeddings.py),
    whatever its shape. A file that declares it as 1 GiB loads as PEFT loads it, without reading it."""
    trained = copy.deepcopy(tiny_gpt2)
    minilora.inject(trained, minilora.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], modules_to_save=["lm_head"]))
    randomize_adapters(trained, seed=1)
    directory = tmp_path / "adapter"
    minilora.save_adapter(trained, directory)
    tensors = load_file(directory / WEIGHTS_NAME)
    ignored = PEFT_PREFIX + "lm_head.modules_to_save.weight"
    save_file({**tensors, ignored: torch.zeros(1)}, directory / WEIGHTS_NAME, metadata={"format": "pt"})
    sparse_tensor(ignored, GIB_A)(directory)
    peft_logits = peft_outcome(tiny_gpt2, directory, directory, second=False)
    assert peft_logits is not None
    model = copy.deepcopy(tiny_gpt2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert peak_python_bytes(lambda: minilora.load_adapter(model, directory)) < 2**24
    with torch.no_grad():
        assert torch.equal(model(INPUT).logits, peft_logits)


def test_a_small_config_is_read_without_setting_aside_its_64_mib_bound(good):
    """adapter_config.json is read up to a bound of 64 MiB (config-over-64-MiB), not into a 64 MiB buffer."""
    from minilora.adapter_config import read_config_fields

    assert peak_python_bytes(lambda: read_config_fields(good)) < 2**22


def test_nan_is_named_before_a_config_from_another_save(tiny_gpt2, tmp_path):
    """The weights checked from the header first, then read: a problem in their values (NaN) is still named
    before the config that is not theirs (refused last, being the least specific)."""
    from safetensors import safe_open

    trained = copy.deepcopy(tiny_gpt2)
    minilora.inject(trained, CONFIG)
    minilora.save_adapter(trained, tmp_path / "adapter")
    path = tmp_path / "adapter" / WEIGHTS_NAME
    with safe_open(path, "pt") as file:
        metadata = file.metadata()
    tensors = load_file(path)
    tensors[A0][0, 0] = math.nan
    save_file(tensors, path, metadata=metadata)
    edit_config(lora_alpha=16)(tmp_path / "adapter")
    model = copy.deepcopy(tiny_gpt2)
    before = model_state(model)
    with pytest.raises(MiniLoraError, match=r"holds NaN or inf values"):
        minilora.load_adapter(model, tmp_path / "adapter")
    assert_same_state(before, model_state(model))


def truncated_after_the_header(monkeypatch, cut: int = 5) -> list[Path]:
    """Every adapter_model.safetensors opened from now on loses its last ``cut`` bytes right after its header
    was read and checked (a process writing it in place), before any tensor is read. Returns the paths cut."""
    from minilora import safetensors_file

    cut_paths, opened = [], safetensors_file.SafetensorsFile.__init__

    def open_then_cut(self, path):
        opened(self, path)
        os.truncate(path, os.path.getsize(path) - cut)
        cut_paths.append(Path(path))
    monkeypatch.setattr(safetensors_file.SafetensorsFile, "__init__", open_then_cut)
    return cut_paths


@pytest.mark.parametrize("reader", list(READERS.values()), ids=list(READERS))
def test_weights_truncated_after_their_header_was_read(reader, good, tiny_gpt2, tmp_path, monkeypatch):
    """A clear MiniLoraError, the model as it was (no SIGBUS: the file is read, not memory-mapped)."""
    directory = tmp_path / "adapter"
    shutil.copytree(good, directory)
    model, load = reader(tiny_gpt2, directory, good)
    before = model_state(model)
    cut = truncated_after_the_header(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(MiniLoraError, match=r"adapter_model\.safetensors changed while it was read .*truncated "
                                                r"after its header was read.*Nothing was loaded"):
            load()
    assert cut == [directory / WEIGHTS_NAME]
    assert_same_state(before, model_state(model))


@pytest.mark.parametrize("command", ["merge", "diff"])
def test_cli_on_weights_truncated_after_their_header_was_read(command, good, tiny_model_dir, tmp_path, capsys,
                                                              monkeypatch):
    from minilora import cli

    directory = tmp_path / "adapter"
    shutil.copytree(good, directory)
    truncated_after_the_header(monkeypatch)
    argv = [command, str(directory), *([str(tmp_path / "merged")] if command == "merge" else []),
            "--model", str(tiny_model_dir)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli.main(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("minilora: error:")]
    assert len(errors) == 1 and "changed while it was read" in errors[0]
    assert not (tmp_path / "merged").exists()


def test_auto_peft_model_on_weights_truncated_between_its_two_reads(good, tiny_gpt2, tmp_path, monkeypatch):
    """AutoPeftModel reads the weights' header for the config (read_saved_config_fields), loads the base
    model, then reads the files again: truncated in between, the second read refuses them."""
    tiny_gpt2.save_pretrained(tmp_path / "base")
    directory = tmp_path / "adapter"
    shutil.copytree(good, directory)
    edit_config(base_model_name_or_path=str(tmp_path / "base"), task_type=None)(directory)
    cut = truncated_after_the_header(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(MiniLoraError, match=r"adapter_model\.safetensors (could not be read|changed while it was "
                                                r"read).*(truncated|corrupt)"):
            minilora.compat.AutoPeftModel.from_pretrained(str(directory))
    assert cut and cut[0] == directory / WEIGHTS_NAME


def handles_open_on(path: Path) -> int:
    """How many of this process's file descriptors are open on ``path`` (Linux: /proc/self/fd)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}") == str(path)
        except OSError:  # (closed meanwhile: the listing's own descriptor)
            pass
    return count


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_handles_open_on_counts_an_open_file(good):
    """The counter the tests below expect 0 from does see a handle (else their 0 would hold whatever leaks)."""
    path = (good / WEIGHTS_NAME).resolve()
    with open(path, "rb"):
        assert handles_open_on(path) == 1
    assert handles_open_on(path) == 0


def compat_load_into_existing(base, directory, good):
    wrapper = CompatPeftModel.from_pretrained(copy.deepcopy(base), str(good))
    return wrapper.get_base_model(), lambda: wrapper.load_adapter(str(directory), "default")


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
@pytest.mark.parametrize("reader, spoil", [
    *((reader, sparse_tensor(A0, [4, 64])) for reader in READERS.values()),  # (lora_A of another shape)
    (compat_load_into_existing, sparse_tensor(A0, [4, 64])),
    (compat_load_into_existing, edit_config(lora_alpha=16)),  # (refused before the weights are checked)
], ids=[*READERS, "compat-load_adapter-existing", "compat-load_adapter-existing-config"])
def test_no_file_stays_open_after_a_load_or_a_kept_refusal(reader, spoil, good, tiny_gpt2, tmp_path):
    """The weights file is opened with its header and read later; once loaded, or refused, it is closed:
    refusals kept by the caller (their tracebacks hold the loader's frames) hold no open file."""
    directory = tmp_path / "adapter"
    shutil.copytree(good, directory)
    path = (directory / WEIGHTS_NAME).resolve()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reader(tiny_gpt2, directory, good)[1]()
        assert handles_open_on(path) == 0
        spoil(directory)
        kept = []
        for _ in range(3):
            model, load = reader(tiny_gpt2, directory, good)
            try:
                load()
            except MiniLoraError as error:
                kept.append(error)
    assert len(kept) == 3 and handles_open_on(path) == 0


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_no_file_stays_open_after_a_kept_refusal_before_the_weights_are_checked(good, tiny_gpt2):
    """compat from_pretrained with a config= that is not the saved one: refused before load_adapter runs."""
    path = (good / WEIGHTS_NAME).resolve()
    kept = []
    for _ in range(3):
        try:
            CompatPeftModel.from_pretrained(copy.deepcopy(tiny_gpt2), str(good),
                                            config=CompatLoraConfig(r=8, target_modules=["c_attn"]))
        except MiniLoraError as error:
            kept.append(error)
    assert len(kept) == 3 and handles_open_on(path) == 0


def test_files_read_once_load_once(good, tiny_gpt2):
    """read_adapter_files' result is loaded once (load_adapter closes the weights file): a second load of it is
    a MiniLoraError that says to read the directory again, the model as it was."""
    from minilora.adapter_files import read_adapter_files

    files = read_adapter_files(good)
    minilora.load_adapter(copy.deepcopy(tiny_gpt2), files)
    model = copy.deepcopy(tiny_gpt2)
    before = model_state(model)
    with pytest.raises(MiniLoraError, match=r"was read and closed already.*Read the directory again"):
        minilora.load_adapter(model, files)
    assert_same_state(before, model_state(model))
