"""`simmim serve`: options and environment, start-up errors, and serving without torch."""

from __future__ import annotations

import base64
import shutil
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
from pydantic import ValidationError
from service_fixtures import ROOT, Reference, ServerProcess, png_bytes

from service.cli import main, parse_settings
from service.settings import Settings
from simmim_core.model_dir import ENCODER_INT8

NO_TORCH = (
    "import sys\n"
    "for name in ('torch', 'torchvision', 'timm'):\n"
    "    sys.modules[name] = None          # any import of them now raises ImportError\n"
    "import service.app, service.cli\n"
    "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
    "sys.exit(service.cli.main(sys.argv[1:]))\n"
)


def simmim(*args: str) -> subprocess.CompletedProcess:
    """The installed `simmim` console script (python -m simmim_cli where it is not on PATH)."""
    script = shutil.which("simmim")
    cmd = [script] if script else [sys.executable, "-m", "simmim_cli"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_help_explains_every_setting_and_names_its_environment_variable():
    result = simmim("serve", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for name, field in Settings.model_fields.items():
        assert f"SIMMIM_{name.upper()}" in text, name
        assert " ".join(field.description.split()) in text, name
        if name != "api_key":
            assert "--" + name.replace("_", "-") in text


def test_flags_override_environment_variables_which_override_defaults(monkeypatch):
    monkeypatch.setenv("SIMMIM_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("SIMMIM_PORT", "9001")
    monkeypatch.setenv("SIMMIM_INT8", "true")
    settings = parse_settings(["--port", "9002", "--no-int8"])
    assert (settings.max_batch_size, settings.port, settings.int8) == (7, 9002, False)
    assert settings.max_wait_ms == Settings.model_fields["max_wait_ms"].default
    with pytest.raises(ValidationError):
        settings.port = 1  # frozen once read


def test_invalid_settings_exit_2_with_a_message(capsys):
    assert main(["--max-images", "100", "--max-queue", "10"]) == 2
    assert "max_queue (10) must be at least max_images (100)" in capsys.readouterr().err
    assert main(["--max-batch-size", "zero"]) == 2
    assert "max_batch_size" in capsys.readouterr().err


def test_an_empty_api_key_means_no_key(monkeypatch):
    monkeypatch.setenv("SIMMIM_API_KEY", "")
    assert parse_settings([]).api_key is None
    monkeypatch.setenv("SIMMIM_API_KEY", "k")
    assert parse_settings([]).api_key.get_secret_value() == "k"


def test_a_directory_that_is_not_a_model_exits_2_naming_the_file(tmp_path):
    result = simmim("serve", "--model-dir", str(tmp_path))
    assert result.returncode == 2
    assert f"{tmp_path / 'model.json'}: missing" in result.stderr


@pytest.fixture(scope="module")
def int8_server_without_torch(tiny_model_dir, tmp_path_factory):
    with ServerProcess(
        tiny_model_dir,
        tmp_path_factory.mktemp("no_torch"),
        program=[sys.executable, "-c", NO_TORCH],
        args=("--int8",),
    ) as server:
        server.wait_ready()
        yield server


def test_the_server_imports_and_serves_without_torch(int8_server_without_torch):
    server = int8_server_without_torch
    image = base64.b64encode(png_bytes(0)).decode()
    assert server.http.post("/embed", json={"images": [image]}).status_code == 200
    assert server.http.post("/reconstruct", json={"image": image}).status_code == 200


def test_int8_serves_the_quantised_encoder(int8_server_without_torch, tiny_model_dir):
    server = int8_server_without_torch
    assert server.http.get("/info").json()["backend"]["encoder_file"] == ENCODER_INT8
    images = [png_bytes(i) for i in range(3)]
    session = ort.InferenceSession(
        str(tiny_model_dir / ENCODER_INT8), providers=["CPUExecutionProvider"]
    )
    expected = session.run(["embedding"], {"pixels": Reference(tiny_model_dir).pixels(images)})[0]
    body = {"images": [base64.b64encode(i).decode() for i in images], "normalize": False}
    vectors = np.array(server.http.post("/embed", json=body).json()["embeddings"], np.float32)
    np.testing.assert_allclose(vectors, expected, atol=1e-5, rtol=0)


def test_the_service_docs_list_every_setting():
    text = (ROOT / "docs" / "service.md").read_text()
    for name in Settings.model_fields:
        assert f"`SIMMIM_{name.upper()}`" in text, name
