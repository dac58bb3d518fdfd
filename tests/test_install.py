"""What `make run` installs is what the service needs: the test extra is for `make test` and the
benchmarks, and the service imports nothing from it."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# A distribution of the test extra, and the modules it installs where the names differ.
MODULES = {"pyyaml": ["yaml"], "kubernetes-validate": ["kubernetes_validate"],
           "pytest": ["pytest", "_pytest"], "lxml-stubs": []}  # fmt: skip


def _test_extra() -> list[str]:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    names = [req.split(">")[0].split("<")[0].split("=")[0].strip().lower()
             for req in pyproject["project"]["optional-dependencies"]["test"]]  # fmt: skip
    return [m for name in names for m in MODULES.get(name, [name.replace("-", "_")])]


def _planned(tmp_path: Path, target: str) -> str:
    """The commands `make TARGET` would run on a fresh clone (no .venv yet)."""
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    planned = subprocess.run([make, "-n", target], cwd=tmp_path, capture_output=True, text=True,
                             check=True)  # fmt: skip
    return planned.stdout


def test_make_run_installs_the_service_and_make_test_the_test_extra(tmp_path: Path) -> None:
    run = _planned(tmp_path, "run")
    assert "pip install --quiet -e .\n" in run, run
    assert "[test]" not in run, run
    assert "pip install --quiet -e '.[test]'" in _planned(tmp_path, "test")


def test_the_service_imports_nothing_from_the_test_extra() -> None:
    """Every module of the four packages, imported with the test extra's modules made
    unimportable, as on a machine where only `make run` installed."""
    blocked = _test_extra()
    assert {"pytest", "hypothesis", "schemathesis", "yaml"} <= set(blocked), blocked
    script = f"""
import importlib, pkgutil, sys
BLOCKED = {blocked!r}
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"{{name}} is in the test extra", name=name)
sys.meta_path.insert(0, Block())
for package in ("bus", "receiver", "pollers", "smsbus"):
    importlib.import_module(package)
    for found in pkgutil.walk_packages(sys.modules[package].__path__, package + "."):
        if found.name != "smsbus.__main__":  # runs the command line
            importlib.import_module(found.name)
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert 0 == done.returncode, done.stderr


def _made_venv(tmp_path: Path) -> Path:
    """A .venv as `make run` leaves it, made by this Python; its packages are the project's own
    .venv's (a path file), so nothing is installed."""
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    venv = tmp_path / ".venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    (site,) = venv.glob("lib/python3.*/site-packages")
    (ours,) = (ROOT / ".venv").glob("lib/python3.*/site-packages")
    (site / "project.pth").write_text(f"{ours}\n")
    (venv / ".installed-stamp").touch()
    return venv


def _gone(venv: Path) -> None:
    """The Python that made it is removed (`pyenv uninstall`, a brew upgrade)."""
    for link in venv.glob("bin/python*"):
        link.unlink()
        link.symlink_to(venv.parent / "removed" / "python3")


def _upgraded(venv: Path) -> None:
    """Its Python is now another minor release, which looks for packages elsewhere."""
    (site,) = venv.glob("lib/python3.*")
    site.rename(site.with_name("python3.0"))


@pytest.mark.parametrize("change", [_gone, _upgraded])
def test_a_venv_whose_python_has_gone_or_changed_is_made_again(
    tmp_path: Path, change: Callable[[Path], None]
) -> None:
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    venv = _made_venv(tmp_path)
    planned = [make, "--no-print-directory", "-n", "run"]  # under `make test` too
    kept = subprocess.run(planned, cwd=tmp_path, capture_output=True, text=True, check=True)
    assert (".venv/bin/smsbus serve\n", "") == (kept.stdout, kept.stderr)
    change(venv)
    made = subprocess.run(planned, cwd=tmp_path, capture_output=True, text=True, check=True)
    assert made.stdout.startswith(
        ".venv was made by a Python that has gone or changed since: making it again\n"
        "python3 -m venv .venv\n"
    ), made.stdout
    assert "pip install --quiet -e .\n" in made.stdout, made.stdout
    assert not venv.exists()
