"""The README's quick start publishes docs/examples/snapshot.json with the model files beside it.

A node that follows the quick start must converge and verify clean, so each file the example
declares must be shipped under docs/examples/ at its relative URL, with the declared size and
digest. (The quick start itself, typed as written, is run by hand; see the README.)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"
SNAPSHOT = json.loads((EXAMPLES / "snapshot.json").read_text(encoding="utf-8"))
FILES = [(m["name"], f) for m in SNAPSHOT["models"] for f in m["files"]]


def test_the_example_declares_at_least_one_model_file() -> None:
    assert FILES


@pytest.mark.parametrize(("model", "entry"), FILES, ids=[f"{m}/{f['path']}" for m, f in FILES])
def test_each_example_model_file_is_shipped_with_its_size_and_digest(
    model: str, entry: dict[str, object]
) -> None:
    urls = entry["urls"]
    assert isinstance(urls, list)
    relative = [u for u in urls if "://" not in u]
    assert relative, f"{model}: the quick start serves the files from the origin folder"
    data = (EXAMPLES / relative[0]).read_bytes()
    assert len(data) == entry["size"]
    assert "sha256:" + hashlib.sha256(data).hexdigest() == entry["digest"]
