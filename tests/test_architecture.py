"""The package layout's rules (DESIGN.md section 1), checked by import-linter and by importing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_in_pyproject_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def test_importing_the_train_serve_contract_imports_no_torch():
    code = (
        "import sys, simmim_core, simmim_core.preprocess, simmim_core.model_dir, "
        "simmim_core.masking, simmim_core.visualize; "
        "heavy = sorted(m for m in ('torch', 'torchvision', 'timm') if m in sys.modules); "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
