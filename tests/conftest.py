"""Shared fixtures: a tiny model trained and exported by the project's own commands."""

from __future__ import annotations

import subprocess
import sys

import pytest


def run_simmim(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the `simmim` CLI in a subprocess; fail the test with its output on error."""
    proc = subprocess.run(
        [sys.executable, "-m", "simmim_cli", *args], capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        pytest.fail(f"simmim {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def tiny_run_dir(tmp_path_factory):
    """A vit-tiny-fmnist run of 2 steps on 64 synthetic images (checkpoint.pt inside)."""
    run = tmp_path_factory.mktemp("tiny") / "run"
    run_simmim(
        "pretrain",
        "--data",
        "synthetic:64",
        "--out",
        str(run),
        "--steps",
        "2",
        "--batch-size",
        "16",
        "--workers",
        "0",
        "--no-progress",
    )
    return run


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_run_dir, tmp_path_factory):
    """The tiny run exported by `simmim export --int8` (encoder, int8 encoder, reconstruct)."""
    out = tmp_path_factory.mktemp("tiny_model") / "model"
    run_simmim("export", str(tiny_run_dir), "--out", str(out), "--int8", "--no-progress")
    return out
