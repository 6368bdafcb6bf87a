"""Golden vectors for readers without numpy: raw little-endian buffers and a small JSON index.

`<name>.golden.bin` holds every array's bytes, C order, little-endian (bool as uint8), each
starting at a multiple of `ALIGN` bytes so that a JS `Float32Array(buffer, offset, n)` needs no
copy; `<name>.golden.json` says where each array is. Both are byte-for-byte reproducible. The
`.npz` stays the file Python reads; this pair is the same arrays for Node, browsers and C.
numpy only.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping

import numpy as np

FORMAT = "xattn-golden-raw"
VERSION = 1
# Offsets are multiples of this: enough for any typed array (Float64Array needs 8).
ALIGN = 16
# dtype kinds a JS typed array can view; bool is written as uint8 (0/1).
_DTYPES = ("bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
           "float16", "float32", "float64")


def raw_names(name: str) -> tuple[str, str]:
    """Base name -> (index file, data file): `<name>.golden.json`, `<name>.golden.bin`."""
    return f"{name}.golden.json", f"{name}.golden.bin"


def write_golden_raw(arrays: Mapping[str, np.ndarray], folder: str, name: str) -> dict:
    """Write `<name>.golden.bin` and `<name>.golden.json` into `folder`; the manifest entry.

    Returns `{"index", "data", "sha256", "index_sha256"}`: file names relative to `folder` and
    the sha256 of each file. Arrays are written in sorted name order; raises ValueError for an
    array a JS reader cannot view (objects, strings, complex).
    """
    index_name, data_name = raw_names(name)
    entries: dict[str, dict] = {}
    digest = hashlib.sha256()
    offset = 0
    with open(os.path.join(folder, data_name), "wb") as f:
        for key in sorted(arrays):
            array = np.asarray(arrays[key])
            dtype = array.dtype.name
            if dtype not in _DTYPES:
                raise ValueError(f"golden array {key!r} has dtype {dtype}, not a raw-writable one")
            stored = array.astype(np.uint8) if dtype == "bool" else array
            data = np.ascontiguousarray(stored, dtype=stored.dtype.newbyteorder("<")).tobytes()
            pad = -offset % ALIGN
            for chunk in (b"\0" * pad, data):
                f.write(chunk)
                digest.update(chunk)
            offset += pad
            entries[key] = {
                "dtype": dtype,
                "shape": [int(d) for d in array.shape],
                "offset": offset,
                "bytes": len(data),
            }
            offset += len(data)
    index = {
        "format": FORMAT,
        "version": VERSION,
        "byte_order": "little",
        "data": data_name,
        "bytes": offset,
        "sha256": digest.hexdigest(),
        "arrays": entries,
    }
    text = (json.dumps(index, indent=2, sort_keys=True) + "\n").encode("utf-8")
    with open(os.path.join(folder, index_name), "wb") as f:
        f.write(text)
    return {
        "index": index_name,
        "data": data_name,
        "sha256": index["sha256"],
        "index_sha256": hashlib.sha256(text).hexdigest(),
    }


def read_golden_raw(folder: str, index_name: str) -> dict[str, np.ndarray]:
    """The arrays back from `write_golden_raw`'s files (for tests and debugging), sha256 checked."""
    with open(os.path.join(folder, index_name), encoding="utf-8") as f:
        index = json.load(f)
    if index.get("format") != FORMAT:
        raise ValueError(f"{index_name} is not a {FORMAT} index")
    with open(os.path.join(folder, os.path.basename(index["data"])), "rb") as f:
        data = f.read()
    if hashlib.sha256(data).hexdigest() != index["sha256"]:
        raise ValueError(f"{index['data']} sha256 does not match {index_name}")
    out = {}
    for key, e in index["arrays"].items():
        stored = "uint8" if e["dtype"] == "bool" else e["dtype"]
        dtype = np.dtype(stored).newbyteorder("<")
        array = np.frombuffer(data, dtype=dtype, count=int(np.prod(e["shape"], dtype=np.int64)),
                              offset=e["offset"]).reshape(e["shape"])
        out[key] = array.astype(bool) if e["dtype"] == "bool" else array.astype(dtype.newbyteorder("="))
    return out
