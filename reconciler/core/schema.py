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

import datetime
import json
import numbers
import re
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any, Literal

__all__ = ["SchemaError", "SchemaName", "certainly_valid", "schema_dir", "validate"]

SchemaName = Literal["root", "head", "snapshot", "settings"]
_BASE = "https://schemas.resultity.io/reconciler/v1/"


class SchemaError(ValueError):
    """A document does not match its schema; the message names the place and the rule."""


def schema_dir() -> Path:
    """Where the schema files are: inside the installed package, else the source tree's."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "schemas", here.parent.parent / "schemas"):
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
    """Raise ``SchemaError`` naming the first violation (deepest, most relevant).

    A document ``certainly_valid`` vouches for is accepted without importing jsonschema
    (~100 ms, more than the rest of a no-op pass); every other one goes to jsonschema, which
    decides and words the error.
    """
    if certainly_valid(name, document):
        return
    jsonschema = _import_jsonschema()
    validator = _validator(name)
    error = jsonschema.exceptions.best_match(validator.iter_errors(document))
    if error is None:
        return
    where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
    message = _too_long(error) or error.message
    if len(message) > 200:
        message = message[:197] + "..."
    raise SchemaError(f"{where}: {message}")


def _too_long(error: Any) -> str | None:
    """A count instead of the value: jsonschema's message starts with the whole value, and a
    list of 33 rollout waves cut at 200 characters would never reach the words "too long"."""
    if error.validator == "maxItems" and isinstance(error.instance, list):
        return f"{len(error.instance)} items, at most {error.validator_value} allowed"
    if error.validator == "maxLength" and isinstance(error.instance, str):
        return f"{len(error.instance)} characters, at most {error.validator_value} allowed"
    return None


# ---- a fast "certainly valid" ----------------------------------------------------------------
#
# Importing jsonschema costs about 100 ms, more than all the rest of `reconcile status` or of a
# no-op pass (bench/startup.py, bench/noop.py). ``certainly_valid`` reads the schema files
# itself and answers True only when it can prove the document matches, using the keywords
# below with the same meaning as the validator above (``pattern`` through ``_compiled``,
# ``integer`` without ``bool``, formats only in forms their checkers surely accept). Anything
# else — a keyword or format it does not know, a value that fails, a NaN — gives False, and
# ``validate`` then asks jsonschema, which decides and words the error. So a document is
# accepted or refused exactly as before; only the time differs (tests/test_schema_fast.py
# holds it to that). A schema that starts using another keyword simply stops taking the fast
# path.

_ANNOTATIONS = frozenset({"$schema", "$id", "$defs", "title", "description"})
_FAST_KEYWORDS = _ANNOTATIONS | {
    "$ref",
    "type",
    "enum",
    "minLength",
    "maxLength",
    "pattern",
    "format",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "const",
    "minItems",
    "maxItems",
    "uniqueItems",
    "items",
    "required",
    "maxProperties",
    "propertyNames",
    "properties",
    "additionalProperties",
    "allOf",
    "not",
    "if",
    "then",
}
# A strict subset of RFC 3986 URIs: scheme "://" plain host, optional port, plain path. Every
# string it matches is a URI to rfc3986-validator; others go to the full check.
_PLAIN_URI = re.compile(r"[a-z][a-z0-9+.-]*://[A-Za-z0-9.-]*(:[0-9]{1,5})?(/[A-Za-z0-9._~-]*)*\Z")
# Likewise for URI references: a plain URI as above, or a relative path whose first segment is
# not empty and has no colon (so it cannot be read as a scheme or an authority).
_PLAIN_RELATIVE = re.compile(r"[A-Za-z0-9._~-]+(/[A-Za-z0-9._~-]*)*\Z")
# And for date-times: the one form the contract writes; the calendar check follows.
_PLAIN_TIME = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})Z\Z")


@cache
def _schema_file(name: str) -> Any:
    return json.loads((schema_dir() / name).read_text(encoding="utf-8"))


def certainly_valid(name: SchemaName, document: object) -> bool:
    """True only if ``document`` surely matches schema ``name``; False means "ask validate"."""
    file = f"{name}.json"
    return _fits(_schema_file(file), document, file)


def _fits(schema: Any, value: object, file: str) -> bool:
    if not isinstance(schema, dict) or not _FAST_KEYWORDS.issuperset(schema):
        return False
    if "$ref" in schema:
        target, in_file = _resolve(schema["$ref"], file)
        if target is None or not _fits(target, value, in_file):
            return False
    checks = (
        _fits_type,
        _fits_enum,
        _fits_string,
        _fits_number,
        _fits_array,
        _fits_object,
        _fits_combined,
    )
    return all(check(schema, value, file) for check in checks)


def _resolve(ref: object, file: str) -> tuple[Any, str]:
    if not isinstance(ref, str) or "~" in ref:
        return None, file
    target_file, _, pointer = ref.partition("#")
    target_file = target_file or file
    if "/" in target_file or not target_file.endswith(".json"):
        return None, file
    node: Any = _schema_file(target_file)
    for part in pointer.split("/")[1:]:
        if not isinstance(node, dict) or part not in node:
            return None, file
        node = node[part]
    return node, target_file


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Number) and not isinstance(value, bool)


def _fits_type(schema: dict[str, Any], value: object, _file: str) -> bool:
    kind = schema.get("type")
    if kind is None:
        return True
    if kind == "string":
        return isinstance(value, str)
    if kind == "integer":
        return _is_integer(None, value)
    if kind == "number":
        return _is_number(value)
    if kind == "array":
        return isinstance(value, list)
    if kind == "object":
        return isinstance(value, dict)
    if kind == "boolean":
        return isinstance(value, bool)
    return False


def _fits_enum(schema: dict[str, Any], value: object, _file: str) -> bool:
    # Only strings: JSON Schema's equality has its own rules for numbers and booleans.
    if "const" in schema and not (isinstance(schema["const"], str) and value == schema["const"]):
        return False
    if "enum" not in schema:
        return True
    return isinstance(value, str) and value in [e for e in schema["enum"] if isinstance(e, str)]


def _fits_string(schema: dict[str, Any], value: object, _file: str) -> bool:
    if not isinstance(value, str):
        return True  # string keywords do not apply to other types
    if not schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", len(value)):
        return False
    if "pattern" in schema and not _compiled(schema["pattern"]).search(value):
        return False
    if "format" in schema:
        return _fits_format(schema["format"], value)
    return True


def _fits_format(form: object, value: str) -> bool:
    if form == "uri":
        return _PLAIN_URI.match(value) is not None
    if form == "uri-reference":
        return _PLAIN_URI.match(value) is not None or _PLAIN_RELATIVE.match(value) is not None
    if form == "date-time":
        match = _PLAIN_TIME.match(value)
        if match is None:
            return False
        try:
            year, month, day, hour, minute, second = (int(part) for part in match.groups())
            datetime.datetime(year, month, day, hour, minute, second)
        except ValueError:
            return False  # 30 February, hour 24, second 60…
        return True
    return False


def _fits_number(schema: dict[str, Any], value: object, _file: str) -> bool:
    if not _is_number(value):
        return True  # numeric keywords do not apply to other types
    if type(value) not in (int, float):
        return False  # Decimal, Fraction, an int subclass…: let the validator decide
    number: Any = value
    # Written so that NaN fails every comparison and goes to the full check.
    return (
        ("minimum" not in schema or number >= schema["minimum"])
        and ("maximum" not in schema or number <= schema["maximum"])
        and ("exclusiveMinimum" not in schema or number > schema["exclusiveMinimum"])
    )


def _fits_array(schema: dict[str, Any], value: object, file: str) -> bool:
    if not isinstance(value, list):
        return True  # array keywords do not apply to other types
    if not schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", len(value)):
        return False
    if schema.get("uniqueItems") and (
        not all(isinstance(item, str) for item in value) or len(set(value)) != len(value)
    ):
        return False
    return "items" not in schema or all(_fits(schema["items"], item, file) for item in value)


def _fits_object(schema: dict[str, Any], value: object, file: str) -> bool:
    if not isinstance(value, dict):
        return True  # object keywords do not apply to other types
    if not all(key in value for key in schema.get("required", ())):
        return False
    if len(value) > schema.get("maxProperties", len(value)):
        return False
    if "propertyNames" in schema and not all(
        _fits(schema["propertyNames"], key, file) for key in value
    ):
        return False
    properties = schema.get("properties", {})
    extra = schema.get("additionalProperties", True)
    for key, item in value.items():
        if key in properties:
            if not _fits(properties[key], item, file):
                return False
        elif extra is False or (extra is not True and not _fits(extra, item, file)):
            return False
    return True


def _fits_combined(schema: dict[str, Any], value: object, file: str) -> bool:
    if "allOf" in schema and not all(_fits(part, value, file) for part in schema["allOf"]):
        return False
    if "not" in schema and not _surely_differs(schema["not"], value):
        return False
    if "if" in schema:
        condition = schema["if"]
        # Only an ``if`` that can be decided exactly either way: a list of required names.
        if not isinstance(condition, dict) or set(condition) != {"required"}:
            return False
        holds = isinstance(value, dict) and all(key in value for key in condition["required"])
        if not holds:
            # ``else`` is not among the fast keywords, so a failed condition asks nothing more.
            return True
        return "then" not in schema or _fits(schema["then"], value, file)
    return "then" not in schema  # a ``then`` without ``if`` means nothing; let validate say so


def _surely_differs(schema: object, value: object) -> bool:
    """True only if ``value`` certainly does not match ``schema`` (``not`` of a string const)."""
    if not isinstance(schema, dict) or set(schema) != {"const"}:
        return False
    const = schema["const"]
    return isinstance(const, str) and isinstance(value, str) and value != const
