"""The manifest's JSON Schema (`export/runtime/manifest.schema.json`, the file the JavaScript verifier reads
too) and the small validator that applies it: standard library only, so the runtime half needs no
`jsonschema`.

The validator knows the keywords that file uses (draft 2020-12 meanings) and refuses a schema
holding any other, so that a keyword added to the file cannot be silently ignored here or in
web/lib/schema.mjs, which implements the same list.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re

from export.errors import ManifestError, short

SCHEMA_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "manifest.schema.json")
# Annotations (no effect on validity) and the keywords `validate` applies.
ANNOTATIONS = frozenset({"$schema", "$id", "title", "description", "$defs"})
KEYWORDS = frozenset({"type", "required", "properties", "items", "minItems", "maxItems",
                      "minLength", "pattern",
                      "minimum", "maximum", "exclusiveMinimum", "anyOf", "dependentRequired",
                      "$ref", "enum"})


@functools.cache
def manifest_schema() -> dict:
    """The manifest schema, read once; ManifestError if the installed file is missing or broken."""
    try:
        with open(SCHEMA_PATH, encoding="utf-8") as f:
            schema = json.load(f)
    except (OSError, ValueError) as e:
        raise ManifestError(f"the manifest schema {SCHEMA_PATH} cannot be read: {e}") from e
    check_schema(schema)
    return schema


def check_schema(schema: dict) -> None:
    """ValueError naming the first keyword `validate` does not apply (anywhere in `schema`)."""
    def walk(node, where):
        if isinstance(node, dict):
            unknown = sorted(set(node) - KEYWORDS - ANNOTATIONS)
            if unknown:
                raise ValueError(f"schema keyword(s) {unknown} at {where} are not implemented")
            for key, value in node.items():
                if key in ("properties", "$defs", "dependentRequired"):
                    for name, sub in value.items():
                        if key != "dependentRequired":
                            walk(sub, f"{where}/{key}/{name}")
                elif key == "items":
                    walk(value, f"{where}/items")
                elif key == "anyOf":
                    for i, sub in enumerate(value):
                        walk(sub, f"{where}/anyOf/{i}")

    walk(schema, "#")


def check_manifest_schema(manifest: object) -> None:
    """ManifestError naming the first place where `manifest` does not match the schema."""
    problem = validate(manifest, manifest_schema())
    if problem:
        raise ManifestError(f"manifest does not match manifest.schema.json: {problem}")


def validate(value: object, schema: dict, root: dict | None = None, where: str = "$") -> str | None:
    """The first place (a `$.inputs[0].shape` path and what it must be) where `value` does not
    match `schema`, or None."""
    root = schema if root is None else root
    if "$ref" in schema:
        target = root
        for part in schema["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        problem = validate(value, target, root, where)
        if problem:
            return problem
    if "type" in schema:
        kinds = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_is(value, kind) for kind in kinds):
            return f"{where} must be {' or '.join(kinds)}, not {short(value)}"
    if "enum" in schema and value not in schema["enum"]:
        return f"{where} must be one of {schema['enum']}, not {short(value)}"
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            return f"{where} must hold at least {schema['minLength']} character(s)"
        if "pattern" in schema and not re.search(schema["pattern"], value):
            return f"{where} must match {schema['pattern']}, not {short(value)}"
    if _is(value, "number"):
        if "minimum" in schema and value < schema["minimum"]:
            return f"{where} must be >= {schema['minimum']}, not {value}"
        if "maximum" in schema and value > schema["maximum"]:
            return f"{where} must be <= {schema['maximum']}, not {value}"
        if "exclusiveMinimum" in schema and not value > schema["exclusiveMinimum"]:
            return f"{where} must be > {schema['exclusiveMinimum']}, not {value}"
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            return f"{where} must hold at least {schema['minItems']} item(s)"
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            return f"{where} must hold at most {schema['maxItems']} item(s)"
        if "items" in schema:
            for i, item in enumerate(value):
                problem = validate(item, schema["items"], root, f"{where}[{i}]")
                if problem:
                    return problem
    if isinstance(value, dict):
        for key in schema.get("required", ()):
            if key not in value:
                return f"{where} lacks {key!r}"
        for key, needs in schema.get("dependentRequired", {}).items():
            missing = [n for n in needs if key in value and n not in value]
            if missing:
                return f"{where} has {key!r} but lacks {missing[0]!r}"
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                problem = validate(value[key], sub, root, f"{where}.{key}")
                if problem:
                    return problem
    if "anyOf" in schema:
        problems = [validate(value, sub, root, where) for sub in schema["anyOf"]]
        if all(problems):
            return " or ".join(problems)
    return None


def _is(value: object, kind: str) -> bool:
    """JSON Schema's types over what json.loads returns (a bool is no number; 1.0 is an integer)."""
    if kind == "null":
        return value is None
    if kind == "boolean":
        return isinstance(value, bool)
    if kind in ("number", "integer"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if isinstance(value, float) and not math.isfinite(value):
            return False
        return kind == "number" or float(value).is_integer()
    return isinstance(value, {"string": str, "array": list, "object": dict}[kind])
