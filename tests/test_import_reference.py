"""`simmim import` checked against implementations no one here wrote (tests/reference.py):
transformers' ViT and Swin for masked image modeling, and official-format SimMIM checkpoints
whose numbers come from transformers' BEiT and Swin. Each source is imported, exported with
`simmim export` and run by onnxruntime on the same pixels and the same masks."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from reference import hf_swin, hf_vit, official_swin, official_vit

import simmim_cli
from simmim_core.model_dir import ENCODER, RECONSTRUCT
from simmim_core.visualize import masked_l1

SOURCES = {
    "hf-vit": lambda root: hf_vit(root / "hf-vit"),
    "hf-swin": lambda root: hf_swin(root / "hf-swin"),
    "official-vit": lambda root: official_vit(root / "official-vit.pth"),
    "official-swin": lambda root: official_swin(root / "official-swin.pth"),
}


def simmim(*args: str) -> None:
    assert simmim_cli.main([*args]) == 0


def export(run, out, *args: str):
    simmim("export", str(run), "--out", str(out), "--no-progress", *args)
    return out


def session(folder, name=ENCODER):
    return ort.InferenceSession(str(folder / name), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module", params=sorted(SOURCES))
def imported(request, tmp_path_factory):
    """(reference, run folder, model directory exported with mean pooling) for each source."""
    root = tmp_path_factory.mktemp(request.param)
    reference = SOURCES[request.param](root)
    simmim("import", str(reference.source), "--out", str(root / "run"))
    return reference, root / "run", export(root / "run", root / "model")


def inputs(reference, n: int = 3, seed: int = 0):
    """Random normalised pixels [n, 3, H, W] and masks, as bool [n, L] and float [n, h, w]."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(n, 3, 32, 32, generator=g)
    masked = torch.rand(n, *reference.grid, generator=g) < 0.6
    return pixels, masked.flatten(1), masked.float()


def test_reconstruction_equals_the_reference_within_1e_4(imported):
    reference, _, model_dir = imported
    pixels, bool_masked_pos, mask = inputs(reference)
    expected, _ = reference.forward(pixels, bool_masked_pos)
    got = session(model_dir, RECONSTRUCT).run(
        None, {"pixels": pixels.numpy(), "mask": mask.numpy()}
    )[0]
    assert np.abs(got - expected.numpy()).max() <= 1e-4


def test_masked_pixel_loss_equals_the_reference_within_1e_5(imported):
    reference, _, model_dir = imported
    pixels, bool_masked_pos, mask = inputs(reference, seed=1)
    _, expected = reference.forward(pixels, bool_masked_pos)
    got = session(model_dir, RECONSTRUCT).run(
        None, {"pixels": pixels.numpy(), "mask": mask.numpy()}
    )[0]
    patch = json.loads((model_dir / "model.json").read_text())["patch_size"]
    losses = [masked_l1(p, r, m, patch) for p, r, m in zip(pixels.numpy(), got, mask.numpy())]
    weights = mask.sum(
        (1, 2)
    ).numpy()  # the reference averages over every masked pixel of the batch
    assert abs(np.average(losses, weights=weights) - expected.item()) <= 1e-5


def test_mean_pooled_embedding_equals_the_mean_of_reference_patch_tokens(imported):
    reference, _, model_dir = imported
    pixels, _, _ = inputs(reference, seed=2)
    patch_tokens, _ = reference.tokens(pixels)
    got = session(model_dir).run(None, {"pixels": pixels.numpy()})[0]
    assert np.abs(got - patch_tokens.mean(1).numpy()).max() <= 1e-4


def test_the_card_says_where_the_weights_came_from(imported):
    reference, _, model_dir = imported
    card = json.loads((model_dir / "model.json").read_text())
    assert card["training"]["imported"]["path"] == str(reference.source.resolve())
    assert card["training"]["imported"]["fresh"] == []
    assert "imported from" in card["domain"]


@pytest.mark.slow
def test_cls_pooling_is_the_reference_class_token_where_there_is_one(imported, tmp_path, capsys):
    reference, run, _ = imported
    pixels, _, _ = inputs(reference, seed=3)
    _, cls = reference.tokens(pixels)
    args = ["export", str(run), "--out", str(tmp_path / "model"), "--pooling", "cls"]
    if cls is None:  # Swin
        assert simmim_cli.main([*args, "--no-progress"]) == 1
        assert "pooling 'cls' is not available" in capsys.readouterr().err
        return
    got = session(export(run, tmp_path / "model", "--pooling", "cls")).run(
        None, {"pixels": pixels.numpy()}
    )[0]
    assert np.abs(got - cls.numpy()).max() <= 1e-4


@pytest.mark.slow
def test_grid_pooling_is_the_reference_patch_tokens_averaged_on_a_grid(imported, tmp_path):
    reference, run, _ = imported
    pixels, _, _ = inputs(reference, seed=4)
    patch_tokens, _ = reference.tokens(pixels)
    n, length, dim = patch_tokens.shape
    side = int(length**0.5)
    fmap = patch_tokens.transpose(1, 2).reshape(n, dim, side, side)  # NLC -> NCHW
    expected = F.adaptive_avg_pool2d(fmap, 2).flatten(1)
    got = session(export(run, tmp_path / "model", "--pooling", "grid2")).run(
        None, {"pixels": pixels.numpy()}
    )[0]
    assert np.abs(got - expected.numpy()).max() <= 1e-4
