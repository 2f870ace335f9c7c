"""The documentation's reliability table points only at tests that exist (file, function and case)."""

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
