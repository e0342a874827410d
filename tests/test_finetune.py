"""`simmim finetune`: SimMIM's supervised second stage, and what export and evaluate make of it."""

from __future__ import annotations

import json
import math

import numpy as np
import onnxruntime as ort
import pytest
import torch
from tiny import read_metrics, tiny_model

import simmim_cli
from simmim_core.preprocess import Preprocessing, preprocess
from training.checkpoint import inference_model, load_checkpoint, save_atomic
from training.data import open_dataset
from training.optim import layer_decay_groups, layer_id

FT = [
    "--data",
    "synthetic:64",
    "--batch-size",
    "16",
    "--workers",
    "0",
    "--no-progress",
    "--warmup-epochs",
    "0.5",
    "--eval-every",
    "1",
]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    run = tmp_path_factory.mktemp("pre") / "run"
    kwargs = '{"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}'
    assert (
        simmim_cli.main(
            [
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
                "--encoder-kwargs",
                kwargs,
                "--sim-loss",
                "contrastive",  # as the default model's: a projection head fine-tuning drops
            ]
        )
        == 0
    )
    return run


@pytest.fixture(scope="module")
def finetuned(pretrained, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft") / "run"
    assert (
        simmim_cli.main(["finetune", str(pretrained), "--out", str(out), "--epochs", "2", *FT]) == 0
    )
    return out


def test_layer_ids_count_blocks_over_stages_like_beit_and_simmim():
    assert layer_id("encoder.vit.patch_embed.proj.weight", [4]) == 0
    assert layer_id("encoder.mask_token", [4]) == 0
    assert layer_id("encoder.vit.blocks.2.mlp.fc1.weight", [4]) == 3
    assert layer_id("encoder.vit.norm.weight", [4]) == 5
    assert layer_id("head.weight", [4]) == 5
    assert layer_id("encoder.swin.layers.1.blocks.0.attn.qkv.weight", [2, 2, 6, 2]) == 3
    assert layer_id("encoder.swin.layers.1.downsample.reduction.weight", [2, 2, 6, 2]) == 4


def test_layer_decay_gives_the_head_the_full_lr_and_the_patch_embedding_the_least():
    model = tiny_model("vit", encoder_kwargs=dict(patch_size=4, embed_dim=32, depth=2, num_heads=2))
    groups = layer_decay_groups(model, 0.05, 0.5, [2])
    scale = {g["layer"]: g["lr_scale"] for g in groups}
    assert scale == {0: 0.125, 1: 0.25, 2: 0.5, 3: 1.0}
    grouped = [p for g in groups for p in g["params"]]
    assert (
        len(grouped)
        == len({id(p) for p in grouped})
        == sum(1 for p in model.parameters() if p.requires_grad)
    )


def test_finetuning_records_its_labels_recipe_and_test_top1(finetuned):
    ckpt = load_checkpoint(finetuned)
    info = ckpt["finetune"]
    assert info["data"] == "synthetic:64" and info["classes"] == [
        "ellipse",
        "rectangle",
        "triangle",
    ]
    assert info["config"]["epochs"] == 2 and info["layer_decay"] == 0.65
    assert 0.0 <= info["test_top1"] <= 1.0
    assert set(ckpt["head"]) == {"weight", "bias"}


def test_finetuning_logs_steps_and_evaluations_and_draws_them(finetuned):
    rows = read_metrics(finetuned)
    evals = [r for r in rows if "val_top1" in r]
    assert [r["epoch"] for r in evals] == [1.0, 2.0]
    assert all("knn_top1" in r for r in evals)
    lines = (finetuned / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["done"] is True
    assert (finetuned / "loss_curve.png").stat().st_size > 0
    assert (finetuned / "recon_finetuned.png").stat().st_size > 0


def test_the_decoder_is_refitted_on_the_finetuned_encoder(pretrained, finetuned):
    before, after = load_checkpoint(pretrained)["model"], load_checkpoint(finetuned)["model"]
    assert not torch.equal(before["decoder.proj.weight"], after["decoder.proj.weight"])
    assert not torch.equal(
        before["encoder.vit.blocks.0.mlp.fc1.weight"], after["encoder.vit.blocks.0.mlp.fc1.weight"]
    )


def test_evaluate_reports_the_classifiers_top1(finetuned, capsys):
    assert (
        simmim_cli.main(
            [
                "evaluate",
                "--checkpoint",
                str(finetuned),
                "--data",
                "synthetic:64",
                "--probe-epochs",
                "0",
                "--no-progress",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["finetuned_top1"] == pytest.approx(
        load_checkpoint(finetuned)["finetune"]["test_top1"]
    )


def test_export_serves_the_prelogits_features_and_says_it_was_finetuned(finetuned, tmp_path):
    out = tmp_path / "model"
    assert simmim_cli.main(["export", str(finetuned), "--out", str(out), "--no-progress"]) == 0
    card = json.loads((out / "model.json").read_text())
    assert card["finetuned"]["data"] == "synthetic:64"
    assert card["finetuned"]["serves"] == "pre-logits features"
    assert card["pooling"] == "mean" and card["embedding_dim"] == 32
    model, ckpt = inference_model(finetuned)
    spec = Preprocessing.from_dict(card["preprocessing"])
    source = open_dataset("synthetic:64", "test")
    pixels = preprocess([source.encoded(i) for i in range(4)], spec)
    session = ort.InferenceSession(str(out / "encoder.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model.embed(torch.from_numpy(pixels)).numpy()
    np.testing.assert_allclose(session.run(None, {"pixels": pixels})[0], expected, atol=1e-4)


def test_the_card_keeps_the_pretraining_run_apart_from_the_finetuning_run(
    pretrained, finetuned, tmp_path
):
    out = tmp_path / "model"
    assert simmim_cli.main(["export", str(finetuned), "--out", str(out), "--no-progress"]) == 0
    card = json.loads((out / "model.json").read_text())
    training, run = card["training"], card["finetuned"]["run"]
    assert training["command"].startswith("simmim pretrain") and training["steps"] == 2
    recipe = load_checkpoint(pretrained)["train_config"]
    assert training["train_config"] == json.loads(json.dumps(recipe))
    assert run["command"].startswith("simmim finetune")
    assert run["steps"] == load_checkpoint(finetuned)["step"] and run["epochs"] == 2
    assert run["duration_s"] > 0
    assert run["images"] == 64 and run["world_size"] == 1


@pytest.mark.parametrize("stage", ["pretrained", "finetuned"])
def test_the_card_names_the_similarity_term_the_weights_were_pretrained_with(
    stage, request, tmp_path
):
    run, out = request.getfixturevalue(stage), tmp_path / "model"
    assert simmim_cli.main(["export", str(run), "--out", str(out), "--no-progress"]) == 0
    assert json.loads((out / "model.json").read_text())["pretraining"]["sim_loss"] == "contrastive"


def test_bf16_finetuning_on_a_cpu_computes_in_bf16_and_keeps_float32_weights(pretrained, tmp_path):
    def losses(amp: str) -> list[float]:
        out = tmp_path / amp
        once = ["finetune", str(pretrained), "--out", str(out), "--epochs", "1", "--amp", amp]
        assert simmim_cli.main([*once, "--refit-decoder-epochs", "0", "--log-every", "1", *FT]) == 0
        ckpt = load_checkpoint(out)
        assert ckpt["finetune"]["config"]["amp"] == amp
        assert {t.dtype for t in ckpt["model"].values() if t.is_floating_point()} == {torch.float32}
        return [r["loss"] for r in read_metrics(out) if "loss" in r]

    off, bf16 = losses("off"), losses("bf16")
    assert all(np.isfinite(bf16)) and len(bf16) == len(off) == 4
    # MAE's head init (std 2e-5): near-zero logits, so chance, ln 3, in either precision
    chance = pytest.approx(math.log(3), abs=1e-4)
    assert bf16[0] == chance and off[0] == chance
    assert bf16[1:] != off[1:]  # the same seed and batches: only the precision differs


def test_resume_continues_a_finetuning_and_may_extend_it(pretrained, tmp_path):
    out = tmp_path / "ft"
    assert (
        simmim_cli.main(
            [
                "finetune",
                str(pretrained),
                "--out",
                str(out),
                "--epochs",
                "1",
                "--refit-decoder-epochs",
                "0",
                *FT,
            ]
        )
        == 0
    )
    assert (
        simmim_cli.main(
            [
                "finetune",
                str(pretrained),
                "--out",
                str(out),
                "--epochs",
                "2",
                "--resume",
                "--refit-decoder-epochs",
                "0",
                *FT,
            ]
        )
        == 0
    )
    assert load_checkpoint(out)["step"] == 8
    steps = [r["step"] for r in read_metrics(out) if "loss" in r]
    assert len(steps) == len(set(steps))


def test_a_resumed_finetuning_counts_the_time_before_its_resume(pretrained, tmp_path):
    out = tmp_path / "ft"
    once = ["finetune", str(pretrained), "--out", str(out), "--refit-decoder-epochs", "0", *FT]
    assert simmim_cli.main([*once, "--epochs", "1"]) == 0
    ckpt = load_checkpoint(out)
    assert ckpt["seconds"] > 0
    save_atomic({**ckpt, "seconds": 1000.0}, out / "checkpoint.pt")  # as if 1,000 s had passed
    assert simmim_cli.main([*once, "--epochs", "2", "--resume"]) == 0
    done = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert done["done"] and done["seconds"] > 1000


def test_resume_refuses_another_recipe(pretrained, tmp_path, capsys):
    out = tmp_path / "ft"
    simmim_cli.main(
        [
            "finetune",
            str(pretrained),
            "--out",
            str(out),
            "--epochs",
            "1",
            "--refit-decoder-epochs",
            "0",
            *FT,
        ]
    )
    assert (
        simmim_cli.main(
            [
                "finetune",
                str(pretrained),
                "--out",
                str(out),
                "--resume",
                "--layer-decay",
                "0.5",
                *FT,
            ]
        )
        == 2
    )
    assert "--layer-decay 0.5 conflicts" in capsys.readouterr().err


def test_finetuning_unlabelled_images_is_a_one_line_error(pretrained, tmp_path, capsys):
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    for i in range(6):
        Image.new("L", (32, 32), i * 30).save(tmp_path / "imgs" / f"{i}.png")
    assert (
        simmim_cli.main(
            [
                "finetune",
                str(pretrained),
                "--out",
                str(tmp_path / "ft"),
                "--data",
                str(tmp_path / "imgs"),
            ]
        )
        == 2
    )
    assert "needs labels" in capsys.readouterr().err
    assert not (tmp_path / "ft").exists()
