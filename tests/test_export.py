"""`simmim export`: ONNX model directories that match PyTorch, for ViT, Swin and CNN encoders."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import run_simmim

from service.settings import default_model_path
from simmim_core.model_dir import (
    ENCODER,
    ENCODER_INT8,
    RECONSTRUCT,
    ModelDirError,
    load_model_dir,
    sha256_file,
)
from simmim_core.nn.model import ModelConfig, SimMIM
from simmim_core.preprocess import Preprocessing
from training.checkpoint import checkpoint_dict, save_atomic
from training.export import ExportError, export_model_dir
from training.presets import TrainConfig

TINY = {
    "vit": ModelConfig(
        family="vit",
        arch="vit_tiny_patch16_224",
        image_size=32,
        in_chans=3,
        encoder_kwargs=dict(patch_size=4, embed_dim=32, depth=1, num_heads=2),
        mask_patch_size=8,
    ),
    "swin": ModelConfig(
        family="swin",
        arch="swin_tiny_patch4_window7_224",
        image_size=64,
        in_chans=3,
        mask_patch_size=32,
        encoder_kwargs=dict(
            window_size=4, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1)
        ),
    ),
    "cnn": ModelConfig(
        family="cnn", arch="resnet18", image_size=64, in_chans=3, mask_patch_size=16
    ),
}


def write_checkpoint(path, cfg: ModelConfig, seed: int = 0):
    """A randomly initialised model saved exactly as `simmim pretrain` saves it."""
    torch.manual_seed(seed)
    model = SimMIM(cfg)
    spec = Preprocessing("RGB", cfg.image_size, cfg.image_size, "bicubic", (0.5,) * 3, (0.25,) * 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_atomic(checkpoint_dict(model, None, 0, 0, TrainConfig(), spec, "synthetic:32"), path)
    return model.eval()


@pytest.fixture(scope="module", params=sorted(TINY))
def exported(request, tmp_path_factory):
    """(model, model dir) for each family, random weights."""
    root = tmp_path_factory.mktemp(request.param)
    model = write_checkpoint(root / "ckpt.pt", TINY[request.param])
    return model, export_model_dir(root / "ckpt.pt", root / "model")


@pytest.mark.parametrize("batch", [1, 3, 17])
def test_encoder_matches_pytorch_at_any_batch_size(exported, batch):
    model, folder = exported
    cfg = model.cfg
    pixels = torch.randn(batch, cfg.in_chans, cfg.image_size, cfg.image_size)
    session = ort.InferenceSession(str(folder / ENCODER), providers=["CPUExecutionProvider"])
    out = session.run(["embedding"], {"pixels": pixels.numpy()})[0]
    with torch.no_grad():
        expected = model.embed(pixels).numpy()
    assert out.shape == (batch, model.embed_dim)
    np.testing.assert_allclose(out, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("batch", [1, 3, 17])
def test_reconstruction_matches_pytorch_at_any_batch_size(exported, batch):
    model, folder = exported
    cfg = model.cfg
    pixels = torch.randn(batch, cfg.in_chans, cfg.image_size, cfg.image_size)
    mask = (torch.rand(batch, *model.encoder.grid) < 0.6).float()
    session = ort.InferenceSession(str(folder / RECONSTRUCT), providers=["CPUExecutionProvider"])
    out = session.run(["reconstruction"], {"pixels": pixels.numpy(), "mask": mask.numpy()})[0]
    with torch.no_grad():
        expected = model.reconstruct(pixels, mask).numpy()
    assert out.shape == tuple(pixels.shape)
    np.testing.assert_allclose(out, expected, atol=1e-3, rtol=0)


def test_model_card_describes_the_model_and_its_parity(exported):
    model, folder = exported
    card = json.loads((folder / "model.json").read_text())
    assert card["format_version"] == 1
    assert card["embedding_dim"] == model.embed_dim
    assert card["image_size"] == model.cfg.image_size and card["in_chans"] == 3
    assert card["patch_size"] == model.patch_size
    assert card["mask_patch_size"] == model.cfg.mask_patch_size
    assert card["encoder"]["family"] == model.cfg.family
    assert card["preprocessing"]["mean"] == [0.5, 0.5, 0.5]
    parity = card["export"]["parity"]
    assert parity["embedding_max_abs_diff"] <= 1e-4
    assert parity["reconstruction_max_abs_diff"] <= 1e-3


def test_model_card_lists_the_sha256_of_every_file(exported):
    _, folder = exported
    card = json.loads((folder / "model.json").read_text())
    assert set(card["files"]) == {ENCODER, RECONSTRUCT}
    for name, meta in card["files"].items():
        assert meta["sha256"] == sha256_file(folder / name)


def test_onnx_files_are_self_contained(exported):
    _, folder = exported
    assert sorted(p.name for p in folder.iterdir()) == [
        "encoder.onnx",
        "model.json",
        "reconstruct.onnx",
    ]


def test_int8_encoder_loads_and_stays_close_to_fp32(tiny_model_dir):
    card = json.loads((tiny_model_dir / "model.json").read_text())
    assert ENCODER_INT8 in card["files"]
    spec = Preprocessing.from_dict(card["preprocessing"])
    pixels = (
        np.random.default_rng(0)
        .standard_normal((8, spec.channels, spec.crop_size, spec.crop_size))
        .astype(np.float32)
    )
    fp32 = ort.InferenceSession(str(tiny_model_dir / ENCODER)).run(None, {"pixels": pixels})[0]
    int8 = ort.InferenceSession(str(tiny_model_dir / ENCODER_INT8)).run(None, {"pixels": pixels})[0]
    cos = (fp32 * int8).sum(1) / np.linalg.norm(fp32, axis=1) / np.linalg.norm(int8, axis=1)
    assert cos.min() > 0.95
    recorded = card["export"]["int8"]
    assert 0.95 < recorded["cosine_to_fp32_min"] <= recorded["cosine_to_fp32_mean"] <= 1.0 + 1e-6


def test_evaluate_agrees_on_the_checkpoint_and_its_export(tiny_run_dir, tiny_model_dir, tmp_path):
    args = ["--data", "synthetic", "--probe-epochs", "0", "--no-progress"]
    run_simmim(
        "evaluate", "--checkpoint", str(tiny_run_dir), *args, "--out", str(tmp_path / "ckpt.json")
    )
    run_simmim(
        "evaluate", "--model-dir", str(tiny_model_dir), *args, "--out", str(tmp_path / "onnx.json")
    )
    ckpt = json.loads((tmp_path / "ckpt.json").read_text())
    onnx = json.loads((tmp_path / "onnx.json").read_text())
    assert ckpt["test_images"] == onnx["test_images"] == 512
    assert abs(ckpt["knn_top1"] - onnx["knn_top1"]) <= 1 / 512  # one borderline vote at most


def test_existing_output_folder_is_refused(tiny_run_dir, tmp_path):
    (tmp_path / "model").mkdir()
    with pytest.raises(ExportError, match="already exists"):
        export_model_dir(tiny_run_dir, tmp_path / "model")


def _export_fails(tmp_path, checkpoint, *extra) -> str:
    """Run a failing export; check it leaves nothing behind; return its one line of error."""
    out = tmp_path / "out" / "model"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "simmim_cli",
            "export",
            str(checkpoint),
            "--out",
            str(out),
            "--no-progress",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_missing_checkpoint_fails_in_one_line(tmp_path):
    assert "not found" in _export_fails(tmp_path, tmp_path / "nope.pt")


def test_truncated_checkpoint_fails_in_one_line(tiny_run_dir, tmp_path):
    data = (tiny_run_dir / "checkpoint.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    assert "truncated" in _export_fails(tmp_path, tmp_path / "cut.pt")


def test_checkpoint_of_another_architecture_fails_in_one_line(tmp_path):
    write_checkpoint(tmp_path / "ckpt.pt", TINY["vit"])
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    ckpt["model_config"]["encoder_kwargs"]["embed_dim"] = 64  # weights are dim 32
    torch.save(ckpt, tmp_path / "ckpt.pt")
    assert "does not match its architecture" in _export_fails(tmp_path, tmp_path / "ckpt.pt")


def test_unsupported_opset_fails_in_one_line(tiny_run_dir, tmp_path):
    assert "opset 9 is not supported" in _export_fails(tmp_path, tiny_run_dir, "--opset", "9")


def test_default_model_directory_is_valid_and_its_hashes_match():
    folder = default_model_path()
    md = load_model_dir(folder)  # checks every sha256
    assert md.card["training"]["data"] == "fashion-mnist"
    assert md.card["evaluation"]["fp32"]["knn_top1"] > 0.5
    assert sum(p.stat().st_size for p in folder.iterdir()) <= 20 * 2**20


def test_a_tampered_model_file_is_refused(tiny_model_dir, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    with open(copy / ENCODER, "ab") as f:
        f.write(b"\0")
    with pytest.raises(ModelDirError, match="sha256"):
        load_model_dir(copy)


def test_an_unknown_format_version_is_refused(tiny_model_dir, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    card = json.loads((copy / "model.json").read_text())
    card["format_version"] = 99
    (copy / "model.json").write_text(json.dumps(card))
    with pytest.raises(ModelDirError, match="format_version"):
        load_model_dir(copy)


def test_an_intermediate_block_without_the_final_norm_is_exported_and_recorded(tmp_path):
    cfg = dataclasses.replace(
        TINY["vit"], encoder_kwargs=dict(patch_size=4, embed_dim=32, depth=2, num_heads=2)
    )
    write_checkpoint(tmp_path / "ckpt.pt", cfg)
    folder = export_model_dir(
        tmp_path / "ckpt.pt", tmp_path / "model", feature_layer=1, feature_norm=False
    )
    card = json.loads((folder / "model.json").read_text())
    assert card["features"]["feature_layer"] == 1 and card["features"]["feature_norm"] is False
    pixels = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    out = ort.InferenceSession(str(folder / ENCODER)).run(["embedding"], {"pixels": pixels})[0]
    block1 = write_checkpoint(
        tmp_path / "again.pt", dataclasses.replace(cfg, feature_layer=1, feature_norm=False)
    )
    last = write_checkpoint(tmp_path / "last.pt", cfg)
    with torch.no_grad():
        expected = block1.embed(torch.from_numpy(pixels)).numpy()
        default = last.embed(torch.from_numpy(pixels)).numpy()
    np.testing.assert_allclose(out, expected, atol=1e-4, rtol=0)
    assert np.abs(out - default).max() > 1e-2  # not the last block's normed tokens


def test_grid_pooling_exports_a_flattened_grid_that_matches_pytorch(tmp_path):
    write_checkpoint(tmp_path / "ckpt.pt", TINY["vit"])
    folder = export_model_dir(tmp_path / "ckpt.pt", tmp_path / "model", pooling="grid2")
    card = json.loads((folder / "model.json").read_text())
    assert card["pooling"] == "grid2" and card["embedding_dim"] == 32 * 2 * 2
    pixels = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    out = ort.InferenceSession(str(folder / ENCODER)).run(["embedding"], {"pixels": pixels})[0]
    model = write_checkpoint(tmp_path / "again.pt", TINY["vit"])
    with torch.no_grad():
        fmap, _ = model.encoder.forward_features(torch.from_numpy(pixels))  # [3, 32, 8, 8]
        expected = fmap.reshape(3, 32, 2, 4, 2, 4).mean((3, 5)).flatten(1).numpy()
    np.testing.assert_allclose(out, expected, atol=1e-4, rtol=0)
