"""The package's shape stays readable: the trainer has no mixins, no module grows past its size, the recipe
reads top to bottom, and the library does not depend on its command line."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "hf_spectralkd"


def test_the_trainer_is_one_class_over_transformers_trainer():
    from hf_spectralkd import SpectralDistillationTrainer

    ours = [c for c in SpectralDistillationTrainer.__mro__ if c.__module__.startswith("hf_spectralkd")]
    assert ours == [SpectralDistillationTrainer], ours


def test_module_sizes():
    lines = {path.relative_to(PACKAGE).as_posix(): len(path.read_text(encoding="utf-8").splitlines())
             for path in PACKAGE.rglob("*.py")}
    assert lines["training/trainer.py"] <= 350, lines["training/trainer.py"]
    assert {name: n for name, n in lines.items() if n > 400} == {}
    assert {name: n for name, n in lines.items() if name.startswith("recipe/") and n > 250} == {}
    tree = ast.parse((PACKAGE / "recipe" / "run.py").read_text(encoding="utf-8"))
    run = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "run")
    assert run.end_lineno - run.lineno + 1 <= 150


def test_the_library_imports_nothing_from_its_command_line():
    probe = ("import sys, hf_spectralkd, hf_spectralkd.recipe; "
             "print(sorted(m for m in sys.modules if m.startswith('hf_spectralkd.cli')))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=True)
    assert done.stdout.strip() == "[]", done.stdout
