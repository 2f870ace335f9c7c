"""The docs hold: the reliability table points only at tests that exist (file, function and case), and the README is short and its imports exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROW = re.compile(r"^\|.*\|\s*`?(test_\w+\.py)::(test_\w+)(?:\[([^\]]+)\])?`?\s*\|\s*$")


def reliability_rows() -> list[tuple[str, str, str | None]]:
    text = (ROOT / "docs" / "reliability.md").read_text(encoding="utf-8")
    return [match.groups() for line in text.splitlines() if (match := ROW.match(line))]


def test_every_row_of_the_reliability_table_names_a_test_that_exists():
    rows = reliability_rows()
    assert len(rows) >= 100, f"{len(rows)} rows"
    missing = []
    for file, function, case in rows:
        path = ROOT / "tests" / file
        source = path.read_text(encoding="utf-8") if path.is_file() else ""
        if not re.search(rf"^def {function}\(", source, re.M):
            missing.append(f"{file}::{function}")
        elif case is not None and not re.search(rf"[\"']{re.escape(case.split('-')[0])}[\"']", source):
            # a parametrize id is a string literal in its file (of a generated id "a-b-0", its first value)
            missing.append(f"{file}::{function}[{case}]")
    assert not missing, missing


def test_the_readme_links_the_reliability_table():
    assert "docs/reliability.md" in (ROOT / "README.md").read_text(encoding="utf-8")


def test_the_readme_is_short_and_its_python_imports_exist():
    """A user reads the README in minutes (≤ 250 lines), and every ``from hf_spectralkd… import …`` line of its
    Python examples imports."""
    import importlib

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250, len(text.splitlines())
    blocks = re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)
    imports = [line for block in blocks for line in block.splitlines() if line.startswith("from hf_spectralkd")]
    assert len(imports) >= 3, imports
    for line in imports:
        match = re.match(r"from ([\w.]+) import (.+?)(?:\s+#.*)?$", line)
        module = importlib.import_module(match.group(1))
        for name in (n.strip() for n in match.group(2).split(",")):
            assert hasattr(module, name), f"README: {line!r}: {match.group(1)} has no {name}"
