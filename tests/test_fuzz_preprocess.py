"""The decode path under fuzzing: a bounded run of tests/fuzz_preprocess.py (atheris, about a
minute) finds no input that does anything but give the model's tensor or raise
ImageDecodeError, within libFuzzer's per-input time and memory limits. The documented longer
run is in that file's docstring (and docs/service.md)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris")

HARNESS = Path(__file__).with_name("fuzz_preprocess.py")
ROOT = HARNESS.parents[1]


@pytest.mark.slow
def test_a_minute_of_fuzzing_finds_no_input_that_escapes_the_decode_error(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(HARNESS),
            str(tmp_path / "corpus"),
            "-max_total_time=60",
            "-timeout=10",  # seconds per input
            "-rss_limit_mb=2048",
            f"-artifact_prefix={tmp_path}/",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(ROOT)},
        timeout=600,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    runs = int(re.search(r"Done (\d+) runs", log).group(1))
    assert runs > 1000, log[-2000:]  # it did fuzz, beyond the seeds
    assert not list(tmp_path.glob("crash-*")) and not list(tmp_path.glob("timeout-*"))
