"""JSON Schemas of the v1 documents and the node settings, and validation against them.

Pure: reads the schema files shipped in the package once, performs no other I/O.
jsonschema's exceptions do not leave this module: callers get ``SchemaError``.
"""

from __future__ import annotations

import json
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


@cache
def _validator(name: SchemaName) -> Any:
    # Imported lazily: jsonschema costs ~60 ms to import and `status` never needs it.
    import jsonschema
    from referencing import Registry, Resource

    folder = schema_dir()
    resources = []
    for file in sorted(folder.glob("*.json")):
        contents = json.loads(file.read_text(encoding="utf-8"))
        resources.append((_BASE + file.name, Resource.from_contents(contents)))
    registry: Registry[Any] = Registry().with_resources(resources)
    schema = json.loads((folder / f"{name}.json").read_text(encoding="utf-8"))
    cls = jsonschema.validators.validator_for(schema)
    return cls(schema, registry=registry, format_checker=cls.FORMAT_CHECKER)


def validate(name: SchemaName, document: object) -> None:
    """Raise ``SchemaError`` naming the first violation (deepest, most relevant)."""
    import jsonschema

    validator = _validator(name)
    error = jsonschema.exceptions.best_match(validator.iter_errors(document))
    if error is None:
        return
    where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
    message = error.message
    if len(message) > 200:
        message = message[:197] + "..."
    raise SchemaError(f"{where}: {message}")
