"""minilora's safetensors reader (minilora/safetensors_file.py) against safetensors' own: the reader PEFT
loads with, ``safetensors.torch.load_file``. A file one reads, the other reads, to the same tensors
(dtype, shape, bytes); a file one refuses, the other refuses. Hand-made headers for the corners where
Python's json module and safetensors' serde_json differ, then random files."""

from __future__ import annotations

import json
import math
import struct

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from safetensors.torch import load_file

from minilora import MiniLoraError
from minilora.safetensors_file import SafetensorsFile


def both_readers(path) -> tuple[dict | None, dict | None]:
    """(safetensors' load_file's tensors, minilora's), None for a refusal."""
    try:
        theirs = load_file(path)
    except Exception:
        theirs = None
    try:
        opened = SafetensorsFile(path)
        ours = opened.read(opened.entries)
    except MiniLoraError:
        ours = None
    return theirs, ours


def assert_same_reading(path, raw: bytes) -> None:
    theirs, ours = both_readers(path)
    assert (ours is None) == (theirs is None), f"safetensors {'reads' if ours is None else 'refuses'} {raw[:300]!r}"
    if ours is not None:
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert ours[key].dtype == theirs[key].dtype and ours[key].shape == theirs[key].shape
            assert torch.equal(ours[key].reshape(-1).view(torch.uint8), theirs[key].reshape(-1).view(torch.uint8))


def file_of(header: str, data: bytes = b"") -> bytes:
    text = header.encode("utf-8")
    return struct.pack("<Q", len(text)) + text + data


F32 = '"dtype": "F32", "shape": [1], "data_offsets": [0, 4]'  # one float32: 4 bytes of data
# (header, data, whether safetensors 0.8's load_file reads it: pinned, so that a new safetensors that
# changes its mind shows here)
HAND_MADE = {
    "plain": ('{"a": {%s}}' % F32, bytes(4), True),
    "entry-as-a-list": ('{"a": ["F32", [1], [0, 4]]}', bytes(4), True),  # (serde reads a struct from a list)
    "entry-as-a-list-of-2": ('{"a": ["F32", [1]]}', bytes(4), False),
    "entry-as-a-list-of-4": ('{"a": ["F32", [1], [0, 4], 1]}', bytes(4), False),
    "minus-zero-dimension": ('{"a": {"dtype": "F32", "shape": [-0], "data_offsets": [0, 0]}}', b"", False),
    "minus-zero-offset": ('{"a": {"dtype": "F32", "shape": [0], "data_offsets": [-0, 0]}}', b"", False),
    "minus-zero-ignored": ('{"a": {%s, "x": -0}}' % F32, bytes(4), True),
    "NaN-ignored": ('{"a": {%s, "x": NaN}}' % F32, bytes(4), False),
    "Infinity-ignored": ('{"a": {%s, "x": -Infinity}}' % F32, bytes(4), False),
    "1e400-ignored": ('{"a": {%s, "x": 1e400}}' % F32, bytes(4), False),
    "400-digits-ignored": ('{"a": {%s, "x": %s}}' % (F32, "1" * 400), bytes(4), False),
    "2**64-ignored": ('{"a": {%s, "x": %d}}' % (F32, 2**64), bytes(4), True),
    "1e-400-ignored": ('{"a": {%s, "x": 1e-400}}' % F32, bytes(4), True),
    "lone-surrogate-ignored": ('{"a": {%s, "x": ["\\ud800"]}}' % F32, bytes(4), False),
    "lone-surrogate-ignored-key": ('{"a": {%s, "\\udc00": 1}}' % F32, bytes(4), False),
    "surrogate-pair-ignored": ('{"a": {%s, "x": "\\ud83d\\ude00"}}' % F32, bytes(4), True),
    "lone-surrogate-overwritten": ('{"a": {%s, "x": "\\ud800", "x": 1}}' % F32, bytes(4), False),
    "NaN-in-an-overwritten-tensor": ('{"a": {%s, "x": NaN}, "a": {%s}}' % (F32, F32), bytes(4), False),
    "nested-127-deep": ('{"a": {%s, "x": %s}}' % (F32, "[" * 125 + "]" * 125), bytes(4), True),
    "nested-128-deep": ('{"a": {%s, "x": %s}}' % (F32, "[" * 126 + "]" * 126), bytes(4), False),
    "objects-nested-128-deep": ('{"a": {%s, "x": %s1%s}}' % (F32, '{"y": ' * 126, "}" * 126), bytes(4), False),
    "nested-128-deep-overwritten": ('{"a": {%s, "x": %s, "x": 1}}' % (F32, "[" * 126 + "]" * 126), bytes(4), False),
    "F8_E8M0": ('{"a": {"dtype": "F8_E8M0", "shape": [], "data_offsets": [0, 1]}}', b"\x05", True),
    "F4": ('{"a": {"dtype": "F4", "shape": [3, 2], "data_offsets": [0, 3]}}', b"\x12\x34\x56", True),
    "F4-empty": ('{"a": {"dtype": "F4", "shape": [2, 0], "data_offsets": [0, 0]}}', b"", True),
    "F4-odd-last-dimension": ('{"a": {"dtype": "F4", "shape": [2, 3], "data_offsets": [0, 3]}}', bytes(3), False),
    "F4-half-a-byte": ('{"a": {"dtype": "F4", "shape": [3], "data_offsets": [0, 1]}}', bytes(1), False),
    "F6_E2M3": ('{"a": {"dtype": "F6_E2M3", "shape": [4], "data_offsets": [0, 3]}}', bytes(3), False),
    "scalar": ('{"a": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}}', bytes(4), True),
    "BOOL-and-C64": ('{"a": {"dtype": "BOOL", "shape": [2], "data_offsets": [0, 2]}, '
                     '"b": {"dtype": "C64", "shape": [1], "data_offsets": [2, 10]}}',
                     b"\x01\x00" + bytes(range(8)), True),
}


@pytest.mark.parametrize("name", list(HAND_MADE))
def test_hand_made_headers_read_as_safetensors_reads_them(name, tmp_path):
    header, data, read = HAND_MADE[name]
    raw = file_of(header, data)
    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(raw)
    if read:
        load_file(path)
    else:
        with pytest.raises(Exception):  # noqa: PT011 - safetensors' own exception types vary
            load_file(path)
    assert_same_reading(path, raw)


REAL_DTYPES = ["BOOL", "F4", "F6_E2M3", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "F8_E4M3FNUZ", "I16", "U16", "F16",
               "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64"]
BITS = {"F4": 4, "F6_E2M3": 6, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64,
        "F64": 64, "I64": 64, "U64": 64}  # (8 for the others)
MINUS_ZERO = 2**70 + 7  # (written by json.dumps, then replaced by -0: Python reads 0, serde_json a float)
ODD_NUMBERS = st.sampled_from([-1, 2**32, 2**62, 2**64 - 1, 2**64, 4.0, True, "4", None, MINUS_ZERO])
IGNORED_VALUES = [1, None, {"x": [1]}, MINUS_ZERO, math.nan, math.inf, 10**400, "\ud800", ["\udc00"], "\ud83d\ude00",
                  [[[[1]]]], json.loads("[" * 125 + "]" * 125), json.loads("[" * 126 + "]" * 126)]


def mostly(good, bad):
    """``good`` nine times in ten, else ``bad``."""
    return st.integers(0, 9).flatmap(lambda roll: good if roll else bad)


@st.composite
def safetensors_files(draw):
    """Bytes that are, or are almost, a safetensors file: entries laid out in order or not, any dtype, shape
    and offsets, written as an object or a list, fields safetensors ignores (odd JSON among them), metadata
    of any kind, a length that may disagree."""
    count, start, header = draw(st.integers(0, 3)), 0, {}
    for i in range(count):
        dtype = draw(mostly(st.sampled_from(REAL_DTYPES), st.sampled_from(["Q7", "f32", 5, None])))
        shape = draw(mostly(st.lists(st.integers(0, 5), max_size=3),
                            st.lists(st.integers(0, 5) | ODD_NUMBERS, min_size=1, max_size=3)))
        size = math.prod(x for x in shape if type(x) is int and 0 <= x < 100) * BITS.get(dtype, 8) // 8
        offsets = draw(mostly(st.just([start, start + size]),
                              st.lists(st.integers(0, 40) | ODD_NUMBERS, min_size=0, max_size=3)))
        entry = {"dtype": dtype, "shape": shape, "data_offsets": offsets}
        if draw(st.integers(0, 19)) == 0:
            entry.pop(draw(st.sampled_from(sorted(entry))))
        if draw(st.integers(0, 9)) == 0:  # a field safetensors does not know (it ignores it, but parses it)
            entry[draw(st.sampled_from(["foo", "dtype_note"]))] = draw(st.sampled_from(IGNORED_VALUES))
        header[f"t{i}"] = entry if draw(st.integers(0, 9)) else list(entry.values())  # (serde_json reads either)
        start += size
    metadata = draw(mostly(st.sampled_from([{"format": "pt"}, "absent"]), st.sampled_from([None, {"format": 5}, [1],
                                                                                            "x", {}])))
    if metadata != "absent":
        header["__metadata__"] = metadata
    data = draw(st.binary(min_size=start, max_size=start)) + bytes(draw(mostly(st.just(0), st.sampled_from([1, 8]))))
    text = json.dumps(header).replace(str(MINUS_ZERO), "-0").encode() + b" " * draw(st.integers(0, 3))
    length = draw(mostly(st.just(len(text)), st.sampled_from([len(text) + 1, len(text) - 1, 0, 2**64 - 1])))
    return struct.pack("<Q", length) + text + data


@settings(max_examples=400, deadline=None)
@given(raw=safetensors_files())
def test_the_safetensors_reader_accepts_what_safetensors_accepts(raw, tmp_path_factory):
    """minilora reads a file (header first, then each tensor with plain reads) exactly when safetensors reads
    it (an entry's fields beyond dtype, shape and data_offsets ignored, as there), and gives the same tensors,
    bitwise: it is never more lenient than PEFT's reader, nor stricter."""
    path = tmp_path_factory.mktemp("st") / "adapter_model.safetensors"
    path.write_bytes(raw)
    assert_same_reading(path, raw)
