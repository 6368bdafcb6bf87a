"""Length buckets: parsing `--lengths`, and the lengths at which an artifact is verified.

A bucketed artifact holds one signature per bucket (`len_16`, `len_16x32`) plus `serving_default`
(the largest) where its format has signatures (TFLite, SavedModel); an ONNX file has none, so it
gets symbolic length axes instead and is verified at length 1, at every bucket and at the largest.
numpy-free and TensorFlow-free: the parser and `export.runtime.verify` read it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from export.errors import SpecError
from export.spec import ArtifactSpec, bucket_key

# Lengths a symbolic axis is verified at when no buckets are given (`--query-len dynamic`).
DYNAMIC_CHECK_LENGTHS = (1, 7, 32)
SERVING_DEFAULT = "serving_default"


def parse_lengths(text: str) -> tuple[tuple[int, int], ...]:
    """`16,64,256` (Tq = Tkv) or `16x32,64x128` (Tq x Tkv) -> ((16, 16), ...), sorted by work.

    Raises:
        SpecError: anything else, naming the part that is wrong.
    """
    pairs = []
    for part in str(text).split(","):
        part = part.strip().lower()
        # ASCII digits only: int() also takes `1_6`, `+16` and other scripts' digits. An empty
        # part (`16,,64`, a trailing comma) is a typo, not a length to skip.
        values = ([int(f) for f in part.split("x")]
                  if re.fullmatch(r"[0-9]+(?:x[0-9]+)?", part) else [])
        if len(values) not in (1, 2) or any(v <= 0 for v in values):
            raise SpecError(
                f"`--lengths` takes positive lengths L (query and key/value) or TqxTkv, comma "
                f"separated, e.g. 16,64,256 or 16x32,64x128. Received: {part!r} in {text!r}"
            )
        pairs.append((values[0], values[-1]))
    return tuple(sorted(set(pairs), key=lambda p: (p[0] * p[1], p)))


@dataclass(frozen=True)
class Point:
    """One place an artifact is verified: a signature of the file, or a length of a dynamic one.

    Attributes:
        key: how manifests and messages name it (`len_16`, `serving_default`).
        signature: the signature to run (TFLite, SavedModel), or None for the file's only graph.
        spec: the static shapes the point runs at (lengths fixed, no buckets).
        golden_name: its golden vectors' file, shared by every format that runs these shapes.
    """

    key: str
    signature: str | None
    spec: ArtifactSpec
    golden_name: str


def file_spec(spec: ArtifactSpec, *, signatures: bool) -> ArtifactSpec:
    """The spec of the file itself: a bucketed spec's largest bucket for a format with signatures
    (its `serving_default`), symbolic lengths wherever buckets differ for one without."""
    if not spec.lengths or signatures:
        return spec
    qs = {q for q, _ in spec.lengths}
    kvs = {kv for _, kv in spec.lengths}
    return spec.replace(
        lengths=(), name=spec.name, query_mask=True, value_mask=True,
        query_len=None if len(qs) > 1 else spec.query_len,
        kv_len=None if len(kvs) > 1 else spec.kv_len,
    )


def points(spec: ArtifactSpec, *, signatures: bool) -> list[Point]:
    """Where an artifact of `spec` is verified; empty for a plain static artifact (one check).

    With buckets and signatures: every bucket's signature, then `serving_default` (the largest).
    With buckets and no signatures: length 1, every bucket (the largest is the last).
    With symbolic lengths and no buckets: DYNAMIC_CHECK_LENGTHS on each symbolic axis.
    """
    if not spec.lengths and not spec.dynamic_lengths:
        return []
    if spec.lengths and signatures:
        found = [_point(spec, q, kv, bucket_key(q, kv)) for q, kv in spec.lengths]
        largest = found[-1]
        return found + [Point(SERVING_DEFAULT, SERVING_DEFAULT, largest.spec, largest.golden_name)]
    if spec.lengths:
        file = file_spec(spec, signatures=False)
        pairs = [(1 if file.query_len is None else file.query_len,
                  1 if file.kv_len is None else file.kv_len)]
        pairs += [p for p in spec.lengths if p not in pairs]
    else:
        qs = DYNAMIC_CHECK_LENGTHS if spec.query_len is None else (spec.query_len,)
        kvs = DYNAMIC_CHECK_LENGTHS if spec.kv_len is None else (spec.kv_len,)
        pairs = list(zip(qs, kvs)) if len(qs) == len(kvs) else [(q, kv) for q in qs for kv in kvs]
    return [_point(spec, q, kv, bucket_key(q, kv), signature=None) for q, kv in pairs]


def _point(spec: ArtifactSpec, q: int, kv: int, key: str, *, signature: str | None = "") -> Point:
    at = spec.replace(lengths=(), query_len=q, kv_len=kv, name=spec.name,
                      query_mask=spec.query_mask or bool(spec.lengths),
                      value_mask=spec.value_mask or bool(spec.lengths))
    return Point(key, key if signature == "" else signature, at, f"{spec.name}.{key}.golden.npz")


def pick_bucket(lengths, query_len: int, kv_len: int) -> tuple[int, int] | None:
    """The smallest bucket (least Tq*Tkv) that holds a (query_len, kv_len) request, or None."""
    fits = [(q, kv) for q, kv in lengths if q >= query_len and kv >= kv_len]
    return min(fits, key=lambda p: (p[0] * p[1], p)) if fits else None
