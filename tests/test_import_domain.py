"""model.json's `domain`: one line on what images a model is for, written by `simmim export`
(from --domain, an imported run's statement, or the training data) and shown by /info; model
directories written before the field existed still load and serve."""

from __future__ import annotations

import json
import shutil

from service_fixtures import ServerProcess

import simmim_cli
from service.settings import default_model_path
from simmim_core.model_dir import load_model_dir


def card(folder) -> dict:
    return json.loads((folder / "model.json").read_text())


def test_export_derives_the_domain_from_the_training_data(tiny_model_dir):
    assert (
        card(tiny_model_dir)["domain"]
        == "32 px grayscale images of synthetic shapes (a test model)"
    )


def test_export_writes_the_domain_it_is_given(tiny_run_dir, tmp_path):
    line = "32 px grayscale sketches of shoes"
    out = tmp_path / "model"
    assert (
        simmim_cli.main(
            ["export", str(tiny_run_dir), "--out", str(out), "--domain", line, "--no-progress"]
        )
        == 0
    )
    assert card(out)["domain"] == line


def test_the_default_model_says_it_is_for_small_grayscale_clothing_images():
    domain = card(default_model_path())["domain"]
    assert "32 px grayscale" in domain and "Fashion-MNIST" in domain and "not photographs" in domain


def test_info_shows_the_domain_and_a_model_dir_without_one_still_serves(tiny_model_dir, tmp_path):
    old = tmp_path / "old-model"
    shutil.copytree(tiny_model_dir, old)
    legacy = {k: v for k, v in card(old).items() if k != "domain"}
    (old / "model.json").write_text(json.dumps(legacy))
    load_model_dir(old)  # the card's sha256s cover the ONNX files, not model.json
    for folder, expected in ((tiny_model_dir, card(tiny_model_dir)["domain"]), (old, None)):
        with ServerProcess(folder, tmp_path, api_key=None) as server:
            server.wait_ready()
            info = server.http.get("/info").json()
        assert info["state"] == "ready" and info["model"].get("domain") == expected
