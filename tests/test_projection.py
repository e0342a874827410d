"""Projections fitted at export (PCA, PCA-whitening) and the fair baseline they allow."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

import simmim_cli
from simmim_core.preprocess import Preprocessing, preprocess
from training.checkpoint import inference_model
from training.data import open_dataset
from training.projection import fit_projection, parse_projection


def correlated(n: int = 500, d: int = 6, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + 3.0).astype(np.float32)


def test_pca_whitening_gives_uncorrelated_unit_variance_axes():
    x = correlated()
    z = fit_projection(x, "pca-whiten", 4)(x)
    np.testing.assert_allclose(np.cov(z, rowvar=False), np.eye(4), atol=1e-3)
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-4)


def test_pca_keeps_the_directions_of_largest_variance_in_order():
    z = fit_projection(correlated(), "pca", 3)(correlated())
    variances = z.var(0)
    assert variances[0] > variances[1] > variances[2]


@pytest.mark.parametrize("kind", ["pca", "pca-whiten"])
def test_the_first_axes_of_a_projection_are_the_projection_to_fewer_axes(kind):
    """Why /v1/embeddings may shorten a projected model's vectors (`dimensions`)."""
    x = correlated()
    np.testing.assert_allclose(
        fit_projection(x, kind, 5)(x)[:, :2], fit_projection(x, kind, 2)(x), atol=1e-4
    )


def test_projection_specs_are_parsed_or_rejected_with_the_form():
    assert parse_projection("pca-whiten:256") == ("pca-whiten", 256)
    for bad in ("pca", "whiten:3", "pca:0", "pca:x"):
        with pytest.raises(ValueError, match="pca-whiten:D"):
            parse_projection(bad)


def test_more_axes_than_the_data_has_is_refused():
    with pytest.raises(ValueError, match="at most 6"):
        fit_projection(correlated(d=6), "pca", 7)


def test_export_bakes_the_projection_into_the_encoder_and_records_it(tiny_run_dir, tmp_path):
    out = tmp_path / "model"
    assert (
        simmim_cli.main(
            [
                "export",
                str(tiny_run_dir),
                "--out",
                str(out),
                "--project",
                "pca-whiten:8",
                "--pooling",
                "grid2",
                "--no-progress",
            ]
        )
        == 0
    )
    card = json.loads((out / "model.json").read_text())
    assert card["embedding_dim"] == 8
    assert card["projection"]["kind"] == "pca-whiten" and card["projection"]["input_dim"] == 512
    assert card["projection"]["fitted_on"] == "synthetic:64"
    assert card["features"]["pooled_dim"] == 512  # 128 x 2 x 2
    # the ONNX output is the checkpoint's embedding projected with a fit on the training split
    model, _ = inference_model(tiny_run_dir, pooling="grid2")
    spec = Preprocessing.from_dict(card["preprocessing"])
    train = open_dataset("synthetic:64", "train")

    @torch.no_grad()
    def embed(source):
        pixels = preprocess([source.encoded(i) for i in range(len(source))], spec)
        return model.embed(torch.from_numpy(pixels)).numpy()

    projection = fit_projection(embed(train), "pca-whiten", 8)
    test = open_dataset("synthetic:64", "test")
    pixels = preprocess([test.encoded(i) for i in range(5)], spec)
    session = ort.InferenceSession(str(out / "encoder.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = projection(model.embed(torch.from_numpy(pixels)).numpy())
    np.testing.assert_allclose(session.run(None, {"pixels": pixels})[0], expected, atol=1e-3)


def test_evaluate_applies_the_same_projection_to_pixels(capsys):
    assert (
        simmim_cli.main(
            [
                "evaluate",
                "--pixels",
                "--data",
                "synthetic:64",
                "--project",
                "pca-whiten:16",
                "--probe-epochs",
                "0",
                "--no-progress",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["embedding_dim"] == 16 and report["projection"]["kind"] == "pca-whiten"


def test_a_wrong_projection_spec_is_a_one_line_error(tiny_run_dir, tmp_path, capsys):
    assert (
        simmim_cli.main(
            ["export", str(tiny_run_dir), "--out", str(tmp_path / "m"), "--project", "whiten:8"]
        )
        != 0
    )
    assert "pca-whiten:D" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
