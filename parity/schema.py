"""The --parity-json schema (record.schema.json) and a small validator for the subset of JSON Schema it uses.

jsonschema is not a dependency of the suite; this covers exactly the keywords the schema file uses
($ref to local $defs, type, enum, properties, required, additionalProperties, items, anyOf, pattern,
minimum), so CI can check a written file with nothing but the standard library.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

SCHEMA_PATH = Path(__file__).with_name("record.schema.json")
_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
}
_KNOWN = {"$schema", "$id", "$defs", "$ref", "title", "description", "type", "enum", "properties", "required",
          "additionalProperties", "items", "anyOf", "pattern", "minimum"}


def load_schema(path: Path = SCHEMA_PATH) -> dict[str, Any]:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def validate(instance: Any, schema: dict[str, Any] | None = None) -> list[str]:
    """Every violation as 'path: problem'; an empty list means the instance is valid."""
    schema = load_schema() if schema is None else schema
    errors: list[str] = []
    _check(instance, schema, schema, "$", errors)
    return errors


def _resolve(ref: str, root: dict[str, Any]) -> dict[str, Any]:
    """A local JSON pointer such as '#/$defs/record'."""
    if not ref.startswith("#/"):
        raise ValueError(f"only local $ref are supported, got {ref!r}")
    node: Any = root
    for part in ref[2:].split("/"):
        node = node[part]
    return node


def _check(value: Any, schema: dict[str, Any], root: dict[str, Any], path: str, errors: list[str]) -> None:
    unknown = set(schema) - _KNOWN
    if unknown:
        raise ValueError(f"schema keywords not supported by parity.schema: {sorted(unknown)}")
    if "$ref" in schema:
        _check(value, _resolve(schema["$ref"], root), root, path, errors)
    if "anyOf" in schema:
        if not any(not _sub_errors(value, sub, root) for sub in schema["anyOf"]):
            errors.append(f"{path}: {value!r} matches none of the allowed forms")
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_TYPES[t](value) for t in types):
            errors.append(f"{path}: expected {' or '.join(types)}, got {type(value).__name__}")
            return
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} not one of {schema['enum']}")
    if "pattern" in schema and isinstance(value, str) and not re.search(schema["pattern"], value):
        errors.append(f"{path}: {value!r} does not match {schema['pattern']}")
    if "minimum" in schema and _TYPES["number"](value) and value < schema["minimum"]:
        errors.append(f"{path}: {value} < minimum {schema['minimum']}")
    if isinstance(value, dict):
        _check_object(value, schema, root, path, errors)
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            _check(item, schema["items"], root, f"{path}[{i}]", errors)


def _sub_errors(value: Any, schema: dict[str, Any], root: dict[str, Any]) -> list[str]:
    """Violations of one anyOf branch, kept apart from the caller's list."""
    errors: list[str] = []
    _check(value, schema, root, "", errors)
    return errors


def _check_object(value: dict, schema: dict[str, Any], root: dict[str, Any], path: str, errors: list[str]) -> None:
    for key in schema.get("required", ()):
        if key not in value:
            errors.append(f"{path}: missing required {key!r}")
    properties = schema.get("properties", {})
    extra = schema.get("additionalProperties", True)
    for key, item in value.items():
        if key in properties:
            _check(item, properties[key], root, f"{path}.{key}", errors)
        elif extra is False:
            errors.append(f"{path}: unexpected property {key!r}")
        elif isinstance(extra, dict):
            _check(item, extra, root, f"{path}.{key}", errors)
