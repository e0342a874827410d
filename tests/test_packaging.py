"""What the wheel carries besides Python modules (package data): the page at / and the embedded
default model, so that `pip install` and the container image serve both."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = (
    "pyproject.toml",
    "README.md",
    "simmim_cli.py",
    "simmim_core",
    "training",
    "service",
    "simmim_client",
)


def test_the_wheel_carries_the_page_and_the_default_model(tmp_path):
    src = tmp_path / "src"  # a copy: building writes build/ and *.egg-info beside the sources
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copyfile(ROOT / name, src / name)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path / "dist"),
            str(src),
        ],
        check=True,
        capture_output=True,
    )
    [wheel] = (tmp_path / "dist").glob("simmim_service-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    page = {f"service/page/{p.name}" for p in (ROOT / "service" / "page").iterdir()}
    assert page >= {"service/page/index.html", "service/page/page.js", "service/page/page.css"}
    assert page <= names
    assert "service/default_model/model.json" in names
