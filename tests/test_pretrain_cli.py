"""`simmim pretrain` as a new user meets it: one-line errors, no empty run folders, runs over a
folder of images that resume on that folder, and start-up messages that say what is trained."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny import read_metrics

import simmim_cli
from training.checkpoint import load_checkpoint


def image_folder(root: Path, n_per_class: int = 12, colour: bool = False) -> Path:
    """root/{circle,square}/NN.png: two classes of 40 px images."""
    rng = np.random.default_rng(0)
    for label in ("circle", "square"):
        (root / label).mkdir(parents=True)
        for i in range(n_per_class):
            a = rng.integers(0, 60, (40, 40, 3), dtype=np.uint8)
            if label == "square":
                a[10:30, 10:30] = 220
            else:
                y, x = np.mgrid[:40, :40]
                a[(y - 20) ** 2 + (x - 20) ** 2 < 100] = 220
            if colour:
                a[..., 0] = 255 - a[..., 0]
            mode = "RGB" if colour else "L"
            Image.fromarray(a if colour else a[..., 0], mode).save(root / label / f"{i:02d}.png")
    return root


def cli(out: Path, *args: str) -> int:
    """simmim pretrain with the tiny ViT, without the tiny runs' data and batch defaults."""
    tiny = [
        "--encoder-kwargs",
        '{"patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2}',
        "--workers",
        "0",
        "--no-progress",
    ]
    return simmim_cli.main(["pretrain", "--out", str(out), *tiny, *args])


def test_a_folder_run_resumes_on_its_folder_without_data(tmp_path):
    data = image_folder(tmp_path / "images")
    out = tmp_path / "run"
    assert (
        cli(out, "--data", str(data), "--steps", "2", "--batch-size", "8", "--log-every", "1") == 0
    )
    assert cli(out, "--steps", "4", "--resume", "--log-every", "1") == 0
    assert load_checkpoint(out)["data"] == str(data.resolve())
    assert json.loads((out / "config.json").read_text())["images"] == 24
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [1, 2, 3, 4]


def test_a_resumed_run_refuses_other_data(tmp_path, capsys):
    data = image_folder(tmp_path / "images")
    out = tmp_path / "run"
    cli(out, "--data", str(data), "--steps", "1", "--batch-size", "8")
    assert cli(out, "--resume", "--data", "fashion-mnist") == 2
    assert "--data fashion-mnist conflicts" in capsys.readouterr().err


def test_resume_without_a_checkpoint_is_one_line_and_creates_no_folder(tmp_path, capsys):
    assert cli(tmp_path / "nothing", "--resume") == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "no checkpoint" in error and "--out" in error
    assert not (tmp_path / "nothing").exists()


@pytest.mark.parametrize("schedule", [["--steps", "0"], ["--epochs", "0"]])
def test_an_empty_schedule_is_one_line_and_creates_no_folder(schedule, tmp_path, capsys):
    assert cli(tmp_path / "run", "--data", "synthetic:64", *schedule) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "--steps must be at least 1" in error
    assert not (tmp_path / "run").exists()


def test_missing_data_is_one_line_and_creates_no_folder(tmp_path, capsys):
    assert cli(tmp_path / "run", "--data", str(tmp_path / "nonexistent")) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "nonexistent" in error
    assert not (tmp_path / "run").exists()


def test_a_folder_smaller_than_one_batch_lowers_the_batch_size_and_says_so(tmp_path, capsys):
    data = image_folder(tmp_path / "images", n_per_class=5)  # 10 images, preset batch 256
    assert cli(tmp_path / "run", "--data", str(data), "--steps", "1") == 0
    assert "batch size lowered from 256 to 8" in capsys.readouterr().out
    assert load_checkpoint(tmp_path / "run")["train_config"]["batch_size"] == 8


def test_an_explicit_batch_larger_than_the_data_names_the_flag_that_fits(tmp_path, capsys):
    data = image_folder(tmp_path / "images", n_per_class=5)
    assert cli(tmp_path / "run", "--data", str(data), "--batch-size", "64") == 2
    assert "--batch-size 8" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_start_up_says_what_model_is_trained_and_warns_about_colour(tmp_path, capsys):
    data = image_folder(tmp_path / "images", colour=True)
    assert cli(tmp_path / "run", "--data", str(data), "--steps", "1", "--batch-size", "8") == 0
    out = capsys.readouterr().out
    assert "training a 1-channel 32 px model (preset vit-tiny-fmnist)" in out
    assert "--in-chans 3" in out


def test_gray_images_get_no_colour_warning(tmp_path, capsys):
    data = image_folder(tmp_path / "images")
    assert cli(tmp_path / "run", "--data", str(data), "--steps", "1", "--batch-size", "8") == 0
    assert "--in-chans 3" not in capsys.readouterr().out


def test_pretrain_without_torch_says_what_to_install():
    code = (
        "import importlib.abc, sys\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.partition('.')[0] == 'torch':\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import simmim_cli\n"
        "sys.exit(simmim_cli.main(['pretrain', '--out', 'x']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 2
    assert (
        proc.stderr.count("\n") == 1 and "pip install" in proc.stderr and "[train]" in proc.stderr
    )


def pretrain_help(capsys, monkeypatch) -> str:
    """`simmim pretrain --help`, its whitespace collapsed."""
    monkeypatch.setenv("COLUMNS", "400")  # no line wrapping inside the values
    with pytest.raises(SystemExit):
        simmim_cli.main(["pretrain", "--help"])
    return " ".join(capsys.readouterr().out.split())


def test_help_shows_the_presets_values_and_every_pooling(capsys, monkeypatch):
    text = pretrain_help(capsys, monkeypatch)
    assert "(default: None)" not in text
    assert "[preset: vit-tiny-fmnist 256; vit-base-224 128; swin-base-192 128]" in text
    assert "gridK" in text


def test_the_tiny_preset_pretrains_with_the_contrastive_term_and_the_papers_presets_without(
    capsys, monkeypatch
):
    text = pretrain_help(capsys, monkeypatch)
    assert "[preset: vit-tiny-fmnist contrastive; vit-base-224 none; swin-base-192 none]" in text
