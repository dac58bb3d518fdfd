"""Imports run one way: `smsbus` (the entry point) -> `receiver`, `pollers` -> `bus`."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAY_IMPORT = {
    "bus": {"bus"},
    "receiver": {"bus", "receiver"},
    "pollers": {"bus", "pollers"},
    "smsbus": {"bus", "receiver", "pollers", "smsbus"},
}


def imported_packages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & set(MAY_IMPORT)


@pytest.mark.parametrize("package", sorted(MAY_IMPORT))
def test_a_package_imports_only_the_layers_below_it(package: str) -> None:
    wrong = {
        str(path.relative_to(ROOT)): sorted(imported_packages(path) - MAY_IMPORT[package])
        for path in sorted((ROOT / package).glob("*.py"))
    }
    assert {} == {path: names for path, names in wrong.items() if names}


def test_python_dash_m_smsbus_is_the_command() -> None:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "smsbus", "--help"], capture_output=True, text=True, timeout=30
    )
    assert 0 == done.returncode
    assert "serve" in done.stdout and "usage: smsbus" in done.stdout
