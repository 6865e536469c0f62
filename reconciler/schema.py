"""JSON Schemas of the v1 documents and the node settings, and validation against them.

Pure: reads the schema files shipped in the package once, performs no other I/O.
jsonschema's exceptions do not leave this module: callers get ``SchemaError``.

Two rules are tightened to what JSON Schema means and what other validators do:
* ``pattern`` is an ECMA-262 regular expression, where ``$`` matches only at the end of the
  string; Python's ``$`` also matches before a final newline, which let ``"name\n"`` through.
* ``integer`` is a JSON number written without a fraction or exponent: ``7.0`` and ``7e0``
  are refused, so a serial or a count is always a Python ``int`` after validation.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any, Literal

__all__ = ["SchemaError", "SchemaName", "schema_dir", "validate"]

SchemaName = Literal["root", "head", "snapshot", "settings"]
_BASE = "https://schemas.resultity.io/reconciler/v1/"


class SchemaError(ValueError):
    """A document does not match its schema; the message names the place and the rule."""


def schema_dir() -> Path:
    """Where the schema files are: inside the installed package, else the source tree's."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "schemas", here.parent / "schemas"):
        if (candidate / "common.json").is_file():
            return candidate
    raise FileNotFoundError("the reconciler JSON schemas are not installed")


def _import_jsonschema() -> Any:
    # jsonschema probes for every optional format library when it is imported. One of them,
    # rfc3987_syntax (pulled in by jsonschema's format extras), compiles a grammar at import and
    # costs over a second, on every `reconcile` run. We check no IRI formats, so it is blocked
    # unless something else in the process already loaded it; `date-time` uses
    # rfc3339-validator and `uri`/`uri-reference` use rfc3986-validator.
    sys.modules.setdefault("rfc3987_syntax", None)  # type: ignore[arg-type]
    import jsonschema

    return jsonschema


@cache
def _validator(name: SchemaName) -> Any:
    # Imported lazily: jsonschema costs ~100 ms to import.
    jsonschema = _import_jsonschema()
    from referencing import Registry, Resource

    folder = schema_dir()
    resources = []
    for file in sorted(folder.glob("*.json")):
        contents = json.loads(file.read_text(encoding="utf-8"))
        resources.append((_BASE + file.name, Resource.from_contents(contents)))
    registry: Registry[Any] = Registry().with_resources(resources)
    schema = json.loads((folder / f"{name}.json").read_text(encoding="utf-8"))
    base = jsonschema.validators.validator_for(schema)
    strict = jsonschema.validators.extend(
        base,
        validators={"pattern": _pattern},
        type_checker=base.TYPE_CHECKER.redefine("integer", _is_integer),
    )
    return strict(schema, registry=registry, format_checker=base.FORMAT_CHECKER)


def _is_integer(_checker: object, instance: object) -> bool:
    return isinstance(instance, int) and not isinstance(instance, bool)


@cache
def _compiled(pattern: str) -> re.Pattern[str]:
    """``pattern`` with every ``$`` outside a character class anchored at the very end."""
    out: list[str] = []
    escaped = in_class = False
    for char in pattern:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif in_class:
            in_class = char != "]"
        elif char == "[":
            in_class = True
        elif char == "$":
            out.append(r"\Z")
            continue
        out.append(char)
    return re.compile("".join(out))


def _pattern(validator: Any, pattern: str, instance: object, _schema: object) -> Iterator[Any]:
    from jsonschema.exceptions import ValidationError

    if validator.is_type(instance, "string") and not _compiled(pattern).search(str(instance)):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


def validate(name: SchemaName, document: object) -> None:
    """Raise ``SchemaError`` naming the first violation (deepest, most relevant)."""
    jsonschema = _import_jsonschema()
    validator = _validator(name)
    error = jsonschema.exceptions.best_match(validator.iter_errors(document))
    if error is None:
        return
    where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
    message = error.message
    if len(message) > 200:
        message = message[:197] + "..."
    raise SchemaError(f"{where}: {message}")
