"""The shape the architecture promises (docs/architecture.md), checked on the source.

These are the rules a reviewer would otherwise check by eye: short functions, classes of one
concern, the node record changed only through its named transitions, and a repository that
documents itself (nothing points outside it).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "reconciler"
MAX_FUNCTION_LINES = 60
MAX_CLASS_LINES = 300


def _sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _oversized(path: Path, *, base: Path = ROOT) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            limit, kind = MAX_FUNCTION_LINES, "function"
        elif isinstance(node, ast.ClassDef):
            limit, kind = MAX_CLASS_LINES, "class"
        else:
            continue
        length = (node.end_lineno or node.lineno) - node.lineno + 1
        if length > limit:
            where = path.relative_to(base)
            found.append(f"{where}:{node.lineno} {kind} {node.name} is {length} lines")
    return found


def test_no_function_or_class_is_oversized() -> None:
    found = [line for path in _sources() for line in _oversized(path)]
    assert found == []


def test_the_checker_sees_an_oversized_function(tmp_path: Path) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    sample = tmp_path / "sample.py"
    sample.write_text(f"def long() -> None:\n{body}\n\n\ndef short() -> None:\n    pass\n")
    found = _oversized(sample, base=tmp_path)
    assert found == [f"sample.py:1 function long is {MAX_FUNCTION_LINES + 1} lines"]


# A new record built inline, instead of through a transition of core/record.py.
_INLINE_RECORD = re.compile(r"replace\(\s*(?:self\.|node\.)?state\b|NodeState\(")


def test_the_node_record_changes_only_through_its_transitions() -> None:
    record = PACKAGE / "core" / "record.py"
    offenders = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in _sources()
        if path not in (record, PACKAGE / "history" / "recordfile.py")
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if _INLINE_RECORD.search(line)
    ]
    assert offenders == []


_OUTSIDE = re.compile(r"\.\./shared|shared/CONTRACT|shared/STYLE")


def test_nothing_in_the_repository_points_outside_it() -> None:
    tracked = [
        p
        for p in ROOT.rglob("*")
        if p.is_file()
        and ".git" not in p.parts
        and "__pycache__" not in p.parts
        and p.suffix in {".py", ".md", ".toml", ".json", ".cfg", ".in", ""}
        and p != Path(__file__).resolve()
    ]
    offenders = [
        str(p.relative_to(ROOT))
        for p in tracked
        if _OUTSIDE.search(p.read_text(encoding="utf-8", errors="replace"))
    ]
    assert offenders == []
