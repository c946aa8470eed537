"""The dependency direction (DESIGN.md) is a contract that `make lint` checks, and it can fail.

import-linter reads the contracts in pyproject.toml. Each test copies the four packages,
adds one forbidden import to the copy, and expects the check to name it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).parent / "lint-imports"
PACKAGES = ("core", "gateway", "trainer", "local")


def lint(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT), "--no-logo", "--no-cache", "--config", str(root / "pyproject.toml")],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    for package in PACKAGES:
        shutil.copytree(
            ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_the_tree_keeps_its_contracts() -> None:
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "forbidden", "named"),
    [
        ("gateway/ingress.py", "import trainer.data", "gateway.ingress -> trainer.data"),
        ("trainer/loop.py", "import gateway.writer", "trainer.loop -> gateway.writer"),
        ("core/images.py", "import gateway.metrics", "core.images -> gateway.metrics"),
        ("core/bundle.py", "import local.demo", "core.bundle -> local.demo"),
    ],
)
def test_a_forbidden_import_breaks_the_contract(
    copy: Path, module: str, forbidden: str, named: str
) -> None:
    path = copy / module
    path.write_text(path.read_text() + f"\n{forbidden}  # added by the test\n")
    result = lint(copy)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout and named in result.stdout, result.stdout
