"""The Makefile's set-up: a Python older than 3.11 is refused before a ``.venv`` is made of it."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _old_python() -> str | None:
    """An interpreter older than 3.11 that runs here (Ubuntu 22.04's ``python3`` is 3.10), if any."""
    candidates = [shutil.which(f"python3.{minor}") for minor in (10, 9, 8)]
    candidates += sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.*/bin/python3")))
    for path in filter(None, candidates):  # a pyenv shim is on PATH even where its version is not chosen
        r = subprocess.run([path, "-c", "import sys; print(sys.version_info < (3, 11))"], capture_output=True,
                           text=True)
        if r.returncode == 0 and r.stdout.strip() == "True":
            return path
    return None


def test_make_refuses_an_old_python_before_making_its_venv(tmp_path):
    """Before, pip refused it only once ``.venv`` existed, and every later ``make`` reused that ``.venv``."""
    old = _old_python()
    if old is None:
        pytest.skip("no Python older than 3.11 here")
    shutil.copy(ROOT / "Makefile", tmp_path)
    for name in ("pyproject.toml", "constraints.txt"):  # the install's prerequisites; never read here
        (tmp_path / name).touch()
    make = lambda python: subprocess.run(["make", "install", f"PYTHON={python}"], cwd=tmp_path,  # noqa: E731
                                         capture_output=True, text=True, timeout=120)
    r = make(old)
    assert r.returncode != 0 and f"{old} is Python 3." in r.stderr and "needs 3.11 or newer" in r.stderr, r.stderr
    assert not (tmp_path / ".venv").exists()
    # A .venv made of it before this check existed is refused whatever PYTHON says, with the way out.
    subprocess.run([old, "-m", "venv", "--without-pip", str(tmp_path / ".venv")], check=True)
    r = make("python3")
    assert r.returncode != 0 and "after rm -rf .venv" in r.stderr, r.stderr
