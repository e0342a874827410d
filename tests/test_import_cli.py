"""`simmim import` as a command: formats detected, timm checkpoints, runs that the other commands
accept, and one-line errors that name what we do not understand and leave nothing behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import timm
import torch
from reference import hf_vit, official_vit

import simmim_cli
from training.checkpoint import inference_model, load_checkpoint
from training.importers import cli as import_cli
from training.importers.run import detect_format
from training.importers.source import load_torch_file


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A tiny Hugging Face ViT folder and a tiny official SimMIM ViT checkpoint."""
    root = tmp_path_factory.mktemp("sources")
    return {"hf": hf_vit(root / "hf").source, "official": official_vit(root / "ckpt.pth").source}


def run_import(capsys, *args) -> tuple[int, str, str]:
    code = simmim_cli.main(["import", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def fails_in_one_line(capsys, out, *args) -> str:
    """Run `simmim import ... --out out`; it must exit 1 with one line and leave no folder."""
    code, _, err = run_import(capsys, *args, "--out", out)
    assert code == 1
    assert err.startswith("simmim import: ") and err.count("\n") == 1
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.*"))
    return err


def test_every_option_is_in_the_help_with_an_explanation(capsys):
    with pytest.raises(SystemExit) as exit_:
        simmim_cli.main(["import", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for action in import_cli.build_parser()._actions:
        assert action.help, f"{action.option_strings} has no help text"
        for option in action.option_strings:
            assert option in text


def test_the_format_is_detected_from_the_source(sources, tmp_path):
    timm_file = tmp_path / "vit.pth"
    torch.save(
        {"arch": "vit_tiny_patch16_224", "state_dict": {"patch_embed.proj.weight": torch.zeros(1)}},
        timm_file,
    )
    assert detect_format(sources["hf"])[0] == "hf"
    assert detect_format(sources["official"])[0] == "official"
    assert detect_format(timm_file)[0] == "timm"


def test_an_imported_run_is_a_checkpoint_that_evaluate_reads(sources, tmp_path, capsys):
    code, out, _ = run_import(capsys, sources["official"], "--out", tmp_path / "run")
    assert code == 0 and "next: simmim export" in out
    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt["imported"]["format"] == "official" and ckpt["preprocessing"]["color_mode"] == "RGB"
    assert ckpt["preprocessing"]["mean"] == pytest.approx([0.485, 0.456, 0.406])  # ImageNet's
    assert ckpt["preprocessing"]["std"] == pytest.approx([0.229, 0.224, 0.225])
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["command"].startswith("simmim import ")
    assert simmim_cli.main(
        ["evaluate", "--checkpoint", str(tmp_path / "run"), "--data", "synthetic:40",
         "--probe-epochs", "0", "--k", "5", "--no-progress"]
    ) == 0  # fmt: skip
    assert '"knn_top1"' in capsys.readouterr().out


def test_an_imported_run_fine_tunes_and_exports_its_features_with_the_source_preprocessing(
    sources, tmp_path, capsys
):
    run, finetuned, model = tmp_path / "run", tmp_path / "ft", tmp_path / "model"
    assert run_import(capsys, sources["hf"], "--out", run)[0] == 0
    assert simmim_cli.main(
        ["finetune", str(run), "--out", str(finetuned), "--data", "synthetic:64", "--epochs", "1",
         "--batch-size", "16", "--warmup-epochs", "0.5", "--workers", "0", "--no-progress"]
    ) == 0  # fmt: skip
    assert load_checkpoint(finetuned)["finetune"]["data"] == "synthetic:64"
    assert simmim_cli.main(["export", str(finetuned), "--out", str(model), "--no-progress"]) == 0
    card = json.loads((model / "model.json").read_text())
    assert card["finetuned"]["serves"] == "pre-logits features"
    assert card["training"]["imported"]["path"] == str(sources["hf"].resolve())
    assert card["preprocessing"]["color_mode"] == "RGB" and card["image_size"] == 32


def test_a_hugging_face_image_processor_gives_the_preprocessing(sources, tmp_path, capsys):
    from transformers import ViTImageProcessor

    folder = tmp_path / "hf"
    shutil.copytree(sources["hf"], folder)
    ViTImageProcessor(
        image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3], resample=2
    ).save_pretrained(folder)
    assert run_import(capsys, folder, "--out", tmp_path / "run")[0] == 0
    spec = load_checkpoint(tmp_path / "run")["preprocessing"]
    assert spec["mean"] == pytest.approx([0.5, 0.4, 0.3])
    assert spec["std"] == pytest.approx([0.2, 0.25, 0.3])
    assert spec["interpolation"] == "bilinear" and spec["crop_size"] == 32


def test_domain_given_at_import_is_kept_in_the_run(sources, tmp_path, capsys):
    line = "RGB photographs of birds, 32 px"
    assert run_import(capsys, sources["hf"], "--out", tmp_path / "run", "--domain", line)[0] == 0
    assert load_checkpoint(tmp_path / "run")["domain"] == line


def test_a_timm_vit_imports_with_its_pretrained_cfg_and_a_fresh_decoder(tmp_path, capsys):
    torch.manual_seed(0)
    net = timm.create_model("vit_tiny_patch16_224", num_classes=5, img_size=32, patch_size=8).eval()
    folder = tmp_path / "timm"
    folder.mkdir()
    torch.save(net.state_dict(), folder / "pytorch_model.bin")
    cfg = {"mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear", "crop_pct": 0.9}
    (folder / "config.json").write_text(json.dumps({
        "architecture": "vit_tiny_patch16_224",
        "model_args": {"img_size": 32, "patch_size": 8},
        "pretrained_cfg": {**cfg, "input_size": [3, 32, 32]},
    }))  # fmt: skip
    code, out, _ = run_import(capsys, folder, "--out", tmp_path / "run")
    assert code == 0 and "initialised fresh: encoder.mask_token, decoder.proj" in out
    model, ckpt = inference_model(tmp_path / "run")
    spec = ckpt["preprocessing"]
    assert (spec["mean"], spec["interpolation"], spec["resize_size"]) == ([0.5] * 3, "bilinear", 35)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = net.forward_features(pixels)[:, 1:].mean(1)  # timm's own forward
        assert torch.allclose(model.embed(pixels), expected, atol=1e-5)


def test_a_timm_state_dict_without_an_architecture_asks_for_arch(tmp_path, capsys):
    net = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8)
    torch.save(net.state_dict(), tmp_path / "vit.pth")
    err = fails_in_one_line(capsys, tmp_path / "run", tmp_path / "vit.pth")
    assert "give --arch" in err


def test_an_unknown_key_is_named(sources, tmp_path, capsys):
    ckpt = load_torch_file(sources["official"])
    ckpt["model"]["encoder.blocks.0.attn.lora_a"] = torch.zeros(4)
    torch.save({"model": ckpt["model"]}, tmp_path / "odd.pth")
    err = fails_in_one_line(capsys, tmp_path / "run", tmp_path / "odd.pth")
    assert "'encoder.blocks.0.attn.lora_a'" in err


def test_a_fine_tuned_official_checkpoint_is_refused_naming_its_head(sources, tmp_path, capsys):
    ckpt = load_torch_file(sources["official"])
    model = {k: v for k, v in ckpt["model"].items() if not k.startswith("decoder.")}
    model["head.weight"] = torch.zeros(10, 32)
    torch.save({"model": model}, tmp_path / "ft.pth")
    err = fails_in_one_line(capsys, tmp_path / "run", "--format", "official", tmp_path / "ft.pth")
    assert "'head.weight'" in err


def test_an_unknown_config_field_is_named(sources, tmp_path, capsys):
    folder = tmp_path / "hf"
    folder.mkdir()
    config = json.loads((sources["hf"] / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "use_layer_scale": True}))
    (folder / "model.safetensors").write_bytes((sources["hf"] / "model.safetensors").read_bytes())
    assert "field 'use_layer_scale'" in fails_in_one_line(capsys, tmp_path / "run", folder)


def test_an_unsupported_model_type_is_named(tmp_path, capsys):
    folder = tmp_path / "deit"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "deit", "architectures": []}))
    assert "field model_type is 'deit'" in fails_in_one_line(capsys, tmp_path / "run", folder)


def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path, capsys):
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    assert "not a readable PyTorch checkpoint" in fails_in_one_line(
        capsys, tmp_path / "run", tmp_path / "notes.pth"
    )


class Exploit:
    """Unpickling this runs `touch PATH` where code in checkpoints is trusted."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def test_code_pickled_in_a_checkpoint_is_not_run_and_is_named(tmp_path, capsys):
    marker = tmp_path / "ran"
    torch.save({"model": {"x": torch.zeros(1)}, "hook": Exploit(marker)}, tmp_path / "evil.pth")
    err = fails_in_one_line(capsys, tmp_path / "run", tmp_path / "evil.pth")
    assert "refuses (posix.system)" in err and not marker.exists()


def test_an_existing_output_folder_is_refused(sources, tmp_path, capsys):
    (tmp_path / "run").mkdir()
    code, _, err = run_import(capsys, sources["hf"], "--out", tmp_path / "run")
    assert code == 1 and "already exists" in err


def test_a_mapping_error_prints_no_traceback(sources, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "simmim_cli", "import", str(sources["hf"]), "--format", "official",
         "--out", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.startswith("simmim import: ") and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_an_image_size_the_weights_do_not_fit_is_refused(sources, tmp_path, capsys):
    err = fails_in_one_line(capsys, tmp_path / "run", sources["official"], "--image-size", "64")
    assert "is for 32 px images, not --image-size 64" in err
