"""``adapter_model.safetensors`` read with plain file reads: the header first, the values on request.

The file: an 8-byte little-endian header size n, n bytes of JSON, then the data. The JSON maps each
tensor's name to {"dtype", "shape", "data_offsets": [begin, end]} (bytes into the data) and may hold
"__metadata__" (strings to strings). The rules below are those of safetensors 0.8's reader, the one PEFT
loads with (``safetensors.torch.load_file``; tensor.rs: read_metadata, Metadata::validate; the JSON parsed
as its serde_json parses it): a file it refuses is refused here, before any of its data is read. (Not
memory-mapped: a file truncated while mapped kills the process with SIGBUS.)

``load_adapter`` (adapters.py) checks the header's names, shapes and dtypes against the model before it
reads any value (PEFT memory-maps the file, and so reads only what it loads), then reads only the tensors
that load, from the file opened with the header (adapter_files.py, ``AdapterFiles``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import weakref
from collections.abc import Iterable
from pathlib import Path

import torch

from .config import MiniLoraError

MAX_HEADER_SIZE = 100_000_000  # safetensors' own limit
DTYPE_BITS = {"BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
              "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
              "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64}
TORCH_DTYPES = {"BOOL": "bool", "F4": "float4_e2m1fn_x2", "U8": "uint8", "I8": "int8", "F8_E5M2": "float8_e5m2",
                "F8_E4M3": "float8_e4m3fn", "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz",
                "F8_E8M0": "float8_e8m0fnu",
                "I16": "int16", "U16": "uint16", "F16": "float16", "BF16": "bfloat16", "I32": "int32",
                "U32": "uint32", "F32": "float32", "C64": "complex64", "F64": "float64", "I64": "int64",
                "U64": "uint64"}  # (those safetensors.torch 0.8's load_file reads: not F6. F4 is packed two to a byte)
USIZE_MAX = 2**64 - 1
MAX_DEPTH = 127  # serde_json's limit on nested objects and lists


@dataclasses.dataclass(frozen=True)
class HeaderEntry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # byte offsets into the data, which starts after the header
    end: int


class SafetensorsFile:
    """``adapter_model.safetensors`` opened, its header read and checked: ``metadata``, and ``placeholders``,
    each tensor as the header describes it on the meta device (dtype and shape, no values). ``read`` reads
    values from the same open file (the version whose header was read, even if a save has since replaced it)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.file = open(path, "rb", buffering=0)  # noqa: SIM115  (closed by close(), or when this object goes)
        except OSError as error:
            raise unreadable(path, error) from None
        weakref.finalize(self, self.file.close)
        try:
            size = os.fstat(self.file.fileno()).st_size
            n = int.from_bytes(self._read_exactly(0, 8), "little")
            if n > MAX_HEADER_SIZE or 8 + n > size:
                raise ValueError(f"header size {n}: more than the file's {size - 8} bytes after it, or than "
                                 f"safetensors' limit of {MAX_HEADER_SIZE}")
            self.data_start = 8 + n
            self.metadata, self.entries = _parse_header(self._read_exactly(8, n))
            data_end = max((entry.end for entry in self.entries.values()), default=0)
            if self.data_start + data_end != size:
                raise ValueError(f"the header describes {data_end} bytes of data, the file holds {size - 8 - n}")
            self.placeholders = {name: torch.empty(_torch_shape(entry), dtype=entry.dtype, device="meta")
                                 for name, entry in self.entries.items()}  # (a dimension past 2**63 fails here)
        except Exception as error:
            self.file.close()
            raise unreadable(path, error) from None

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The values of the tensors ``names``, on the CPU."""
        if self.file.closed:  # (load_adapter closes it once it has read what it loads)
            raise MiniLoraError(f"{self.path} was read and closed already: files read by read_adapter_files load "
                                "once. Read the directory again (or pass its path to load_adapter).")
        if sys.byteorder != "little":  # safetensors stores little-endian numbers
            raise MiniLoraError(f"{self.path}: reading safetensors files on a big-endian machine is not supported.")
        tensors = {}
        for name in names:
            entry = self.entries[name]
            try:
                data = self._read_exactly(self.data_start + entry.begin, entry.end - entry.begin)
            except OSError as error:
                raise unreadable(self.path, error) from None
            except ValueError as error:  # (a short read)
                raise MiniLoraError(f"{self.path} changed while it was read ({error}): it was truncated after its "
                                    "header was read, e.g. by a process writing it in place. Nothing was loaded. "
                                    "Load it again once that is done, or save the adapter again.") from None
            raw = torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
            tensors[name] = raw.view(entry.dtype).reshape(_torch_shape(entry))
        return tensors

    def close(self) -> None:
        self.file.close()

    def _read_exactly(self, offset: int, size: int) -> bytearray:
        data, got = bytearray(size), 0
        self.file.seek(offset)
        with memoryview(data) as view:
            while got < size:
                count = self.file.readinto(view[got:])
                if not count:
                    raise ValueError(f"{size} bytes at byte {offset} asked for, the file ends after {got}")
                got += count
        return data


def _parse_header(raw: bytearray) -> tuple[dict | None, dict[str, HeaderEntry]]:
    """(metadata or None, {name: entry}) of a safetensors header, checked as safetensors checks it."""
    header = json.loads(raw.decode("utf-8"), object_pairs_hook=_Object,  # (strict UTF-8: no byte-order mark)
                        parse_constant=_no_constant, parse_float=_float, parse_int=_int)
    if not isinstance(header, dict):
        raise ValueError(f"the header is a JSON {type(header).__name__}, not an object")
    if "__metadata__" in header.repeated:  # (a tensor named twice is the last one, as in safetensors)
        raise ValueError("__metadata__ appears twice")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(
            isinstance(value, str) for value in metadata.values())):
        raise ValueError("__metadata__ must map strings to strings")
    entries = {name: _entry(name, value) for name, value in header.items()}
    start = 0
    for name, entry in sorted(entries.items(), key=lambda item: (item[1].begin, item[1].end)):
        if entry.begin != start or entry.end < entry.begin:
            raise ValueError(f"{name}: data_offsets [{entry.begin}, {entry.end}] do not start where the tensor "
                             f"before ends ({start})")
        start = entry.end
    return metadata, entries


# JSON as serde_json (safetensors' parser) reads it, where Python's json module is more lenient: no NaN or
# Infinity, no number beyond float64's range, an integer -0 is a float (not a size), no lone surrogate
# ("\ud800": no UTF-8), at most MAX_DEPTH nested objects and lists; in every part of the header, the fields
# safetensors ignores and the values of repeated keys too (serde_json parses them all).
class _Object(dict):
    """A JSON object that knows which of its keys appeared more than once (json keeps the last value), and
    how deeply objects and lists nest in it (``depth``: 1 for one without any)."""

    def __init__(self, pairs: list[tuple[str, object]]) -> None:
        super().__init__(pairs)
        seen: set[str] = set()
        self.repeated = {key for key, _ in pairs if key in seen or seen.add(key)}  # (linear: headers may be huge)
        self.depth = 1 + max((_depth(key) + _depth(value) for key, value in pairs), default=0)
        if self.depth > MAX_DEPTH:
            raise ValueError(f"objects and lists nested more than {MAX_DEPTH} deep (serde_json's limit)")


def _depth(value: object) -> int:
    """How deeply objects and lists nest in ``value`` (0 for a number); a string must be UTF-8."""
    if isinstance(value, _Object):  # (its own strings were checked when it was made)
        return value.depth
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    if isinstance(value, str):
        value.encode("utf-8")  # (a lone surrogate escaped in JSON is no UTF-8: serde_json refuses it)
    return 0


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _float(text: str) -> float:
    if math.isinf(value := float(text)):
        raise ValueError(f"number out of range: {text[:20]}")
    return value


def _int(text: str) -> int | float:
    if text == "-0":
        return -0.0  # (serde_json reads it as a float)
    value = int(text)
    if not -2**63 <= value <= USIZE_MAX:
        _float(text)  # (serde_json reads it as a float)
    return value


FIELDS = {"dtype", "shape", "data_offsets"}  # what an entry must hold


def _entry(name: str, value: object) -> HeaderEntry:
    # (other fields in an entry are ignored, as safetensors ignores them, even repeated; serde_json also
    # reads an entry written as the list [dtype, shape, data_offsets])
    if isinstance(value, list) and len(value) == len(FIELDS):
        dtype, shape, offsets = value
    elif isinstance(value, dict) and FIELDS <= value.keys() and not FIELDS & value.repeated:
        dtype, shape, offsets = value["dtype"], value["shape"], value["data_offsets"]
    else:
        raise ValueError(f"{name}: an entry holds dtype, shape and data_offsets, once each")
    if dtype not in DTYPE_BITS:
        raise ValueError(f"{name}: unknown dtype {dtype!r}")
    if not getattr(torch, TORCH_DTYPES.get(dtype, ""), None):
        raise ValueError(f"{name}: dtype {dtype} has no torch dtype")
    numbers = [*shape, *offsets] if isinstance(shape, list) and isinstance(offsets, list) else None
    if numbers is None or len(offsets) != 2 or not all(
            type(number) is int and 0 <= number <= USIZE_MAX for number in numbers):
        raise ValueError(f"{name}: shape and data_offsets must be lists of non-negative integers (two offsets)")
    count = 1
    for size in shape:  # (multiplied in order, as safetensors does: an overflow on the way is refused)
        count *= size
        if count > USIZE_MAX:
            raise ValueError(f"{name}: shape {shape} overflows")
    bits = count * DTYPE_BITS[dtype]
    if bits > USIZE_MAX or bits % 8 or offsets[1] - offsets[0] != bits // 8:
        raise ValueError(f"{name}: {dtype} of shape {shape} does not fill data_offsets {offsets}")
    if dtype == "F4" and shape[-1] % 2:  # (bits % 8 == 0: the shape is not empty)
        raise ValueError(f"{name}: F4 of shape {shape}: torch holds two F4 values a byte, along the last dimension")
    return HeaderEntry(getattr(torch, TORCH_DTYPES[dtype]), tuple(shape), offsets[0], offsets[1])


def _torch_shape(entry: HeaderEntry) -> tuple[int, ...]:
    """The tensor's shape in torch: float4_e2m1fn_x2 holds two F4 values a byte, along the last dimension."""
    if entry.dtype == getattr(torch, "float4_e2m1fn_x2", None):
        return (*entry.shape[:-1], entry.shape[-1] // 2)
    return entry.shape


def unreadable(path: Path, error: Exception) -> MiniLoraError:
    return MiniLoraError(f"{path} could not be read ({type(error).__name__}: {error}). The file is truncated "
                         "or corrupt: save the adapter again.")
