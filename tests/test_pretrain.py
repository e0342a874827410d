"""`simmim pretrain`: the paper's recipe, exact resume, DDP, checkpoints and the run's files.

Runs use tiny encoders on `synthetic:64` (64 images, batch 8: 8 optimizer steps per epoch) in
this process, except the torchrun test, which starts two processes.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import pretrain, read_metrics, tiny_model

from training import checkpoint as checkpoint_module
from training import pretrain as pretrain_module
from training.checkpoint import CheckpointError, load_checkpoint, save_atomic, state_digest
from training.data import epoch_batches
from training.optim import param_groups
from training.schedule import lr_at

REPO = Path(__file__).resolve().parents[1]


# ---- the learning-rate schedule ---------------------------------------------------------------

SCHEDULE = dict(total_steps=100, warmup_steps=10, lr=1e-3, warmup_lr=1e-6, min_lr=1e-5)


def test_lr_warmup_starts_at_warmup_lr():
    assert lr_at(0, **SCHEDULE) == pytest.approx(1e-6)


def test_lr_warmup_is_linear_and_peaks_at_lr_when_warmup_ends():
    lrs = [lr_at(s, **SCHEDULE) for s in range(11)]
    assert np.allclose(np.diff(lrs[:10]), (1e-3 - 1e-6) / 10)
    assert lrs[10] == pytest.approx(1e-3)
    assert max(lr_at(s, **SCHEDULE) for s in range(100)) == pytest.approx(1e-3)


def test_lr_decays_by_cosine_after_warmup_and_ends_at_min_lr():
    lrs = [lr_at(s, **SCHEDULE) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert lr_at(55, **SCHEDULE) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5)  # half way
    assert lr_at(100, **SCHEDULE) == pytest.approx(1e-5)
    assert lr_at(99, **SCHEDULE) == pytest.approx(1e-5, abs=1e-6)


def test_lr_without_warmup_starts_at_lr():
    assert lr_at(0, 50, 0, 1e-3, 1e-6, 1e-5) == pytest.approx(1e-3)


def test_a_run_follows_the_schedule_with_lr_scaled_by_total_batch_over_512(tmp_path):
    # lr = base_lr * batch * accum * world / 512 = 0.256 * 8 * 2 / 512 = 0.008
    out = tmp_path / "run"
    pretrain(
        out,
        "--steps",
        "6",
        "--accum-steps",
        "2",
        "--base-lr",
        "0.256",
        "--warmup-epochs",
        "0.5",
        "--warmup-lr",
        "0.0001",
        "--min-lr",
        "0.0002",
    )
    config = json.loads((out / "config.json").read_text())
    assert config["lr"] == pytest.approx(0.008)
    assert config["steps_per_epoch"] == 4  # 64 // 8 // 2
    lrs = [row["lr"] for row in read_metrics(out)]
    # warmup 2 steps from 1e-4, then cosine over the 4 others down toward 2e-4
    expected = [lr_at(s, 6, 2, 0.008, 1e-4, 2e-4) for s in range(6)]
    assert lrs == pytest.approx(expected)
    assert lrs[0] == pytest.approx(1e-4) and lrs[2] == pytest.approx(0.008)


# ---- the optimizer -----------------------------------------------------------------------------


def no_decay_names(model) -> set[str]:
    groups = param_groups(model, 0.05)
    ids = {id(p) for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_no_weight_decay_on_mask_token_cls_token_position_embeddings_biases_and_norms():
    model = tiny_model("vit")
    skip = no_decay_names(model)
    for name in (
        "encoder.mask_token",
        "encoder.vit.cls_token",
        "encoder.vit.pos_embed",
        "encoder.vit.norm.weight",
        "encoder.vit.norm.bias",
        "encoder.vit.blocks.0.attn.qkv.bias",
        "decoder.proj.bias",
    ):
        assert name in skip
    for name in (
        "encoder.vit.blocks.0.attn.qkv.weight",
        "encoder.vit.patch_embed.proj.weight",
        "decoder.proj.weight",
    ):
        assert name not in skip


def test_no_weight_decay_on_swin_relative_position_bias_tables():
    # SimMIM's Swin skips relative_position_bias_table (no_weight_decay_keywords)
    model = tiny_model("swin")
    skip = no_decay_names(model)
    tables = [n for n, _ in model.named_parameters() if "relative_position_bias_table" in n]
    assert tables and set(tables) <= skip
    assert "encoder.mask_token" in skip


def test_every_trainable_parameter_is_in_exactly_one_optimizer_group_and_ema_in_none():
    model = tiny_model("vit", sim_loss="perceptual")
    groups = param_groups(model, 0.05)
    ids = [id(p) for g in groups for p in g["params"]]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert sorted(ids) == sorted(trainable) and len(set(ids)) == len(ids)
    assert not {id(p) for p in model.ema_encoder.parameters()} & set(ids)
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]


# ---- data order ------------------------------------------------------------------------------


def test_epoch_batches_are_full_batches_only_like_drop_last():
    batches = epoch_batches(70, 8, seed=0, epoch=0)
    assert len(batches) == 8 and all(len(b) == 8 for b in batches)
    assert len(set(sum(batches, []))) == 64


def test_epoch_batches_of_the_ranks_are_disjoint_and_reshuffled_every_epoch():
    r0, r1 = (sum(epoch_batches(64, 4, 0, 0, rank, 2), []) for rank in (0, 1))
    assert len(r0) == len(r1) == 32 and not set(r0) & set(r1)
    assert epoch_batches(64, 4, 0, 1) != epoch_batches(64, 4, 0, 0)
    assert epoch_batches(64, 4, 0, 1) == epoch_batches(64, 4, 0, 1)


# ---- training works ----------------------------------------------------------------------------


def test_a_short_pretrain_on_synthetic_images_lowers_the_loss(tmp_path):
    out = tmp_path / "run"
    assert (
        pretrain(
            out,
            "--data",
            "synthetic:256",
            "--batch-size",
            "16",
            "--steps",
            "80",
            "--base-lr",
            "0.05",
            "--warmup-epochs",
            "0.25",
            "--seed",
            "0",
        )
        == 0
    )
    losses = [row["loss"] for row in read_metrics(out)]
    assert len(losses) == 80 and all(math.isfinite(x) for x in losses)
    early, late = np.mean(losses[:15]), np.mean(losses[-15:])
    assert late < 0.85 * early, f"loss went from {early:.4f} to {late:.4f}"


def test_eval_every_logs_online_knn_before_the_first_epoch_and_after_each(tmp_path):
    out = tmp_path / "run"
    assert pretrain(out, "--epochs", "2", "--eval-every", "1") == 0
    evals = [r for r in read_metrics(out) if "knn_top1" in r]
    assert [r["epoch"] for r in evals] == [0, 1, 2]
    assert [r["step"] for r in evals] == [0, 8, 16]  # 64 images, batches of 8
    for r in evals:  # 64 labelled images: 54 in the bank, 10 queries
        assert (r["eval_bank"], r["eval_queries"]) == (54, 10)
        assert 0 <= r["knn_top1"] <= 1 and 0 <= r["knn_top1_whitened"] <= 1
        assert set(r["knn_by_feature"]) == {"block1/mean"}  # depth 1, mean pooling


def test_the_same_seed_gives_the_same_run(tmp_path):
    pretrain(tmp_path / "a", "--steps", "3")
    pretrain(tmp_path / "b", "--steps", "3")
    a = [r["loss"] for r in read_metrics(tmp_path / "a")]
    b = [r["loss"] for r in read_metrics(tmp_path / "b")]
    assert a == b


class Killed(Exception):
    """Stands for the process being killed right after a checkpoint was written."""


def test_resume_continues_bit_identically_on_cpu(tmp_path, monkeypatch):
    # 12 steps straight, against: the same run killed after its step-6 checkpoint (in the middle
    # of epoch 0, 8 steps per epoch) and resumed with --resume. drop_path draws from torch's RNG,
    # so the RNG state has to be restored exactly too.
    args = [
        "--steps",
        "12",
        "--encoder-kwargs",
        '{"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "drop_path_rate": 0.2}',
    ]
    assert pretrain(tmp_path / "straight", *args) == 0

    real_save = pretrain_module.save_atomic

    def save_then_die(obj, path):
        real_save(obj, path)
        if obj["step"] == 6:
            raise Killed

    monkeypatch.setattr(pretrain_module, "save_atomic", save_then_die)
    with pytest.raises(Killed):
        pretrain(tmp_path / "resumed", *args, "--save-every", "6")
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "resumed")["step"] == 6
    assert pretrain(tmp_path / "resumed", *args, "--resume") == 0

    a = load_checkpoint(tmp_path / "straight")
    b = load_checkpoint(tmp_path / "resumed")
    assert a["step"] == b["step"] == 12
    assert a["model"].keys() == b["model"].keys()
    different = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    assert not different, f"parameters differ after resume: {different}"
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # the metrics of the steps after the resume are those of the straight run
    straight = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "straight")}
    resumed = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "resumed")}
    assert resumed == straight


def test_resume_may_extend_the_schedule_with_steps(tmp_path):
    out = tmp_path / "run"
    pretrain(out, "--steps", "2", "--mask-ratio", "0.4")
    assert pretrain(out, "--steps", "3", "--resume") == 0
    assert json.loads((out / "config.json").read_text())["model"]["mask_ratio"] == 0.4
    assert load_checkpoint(out)["step"] == 3


def test_a_resumed_run_counts_the_time_before_its_resume(tmp_path):
    out = tmp_path / "run"
    pretrain(out, "--steps", "2")
    ckpt = load_checkpoint(out)
    assert ckpt["seconds"] > 0
    save_atomic({**ckpt, "seconds": 1000.0}, out / "checkpoint.pt")  # as if 1,000 s had passed
    pretrain(out, "--steps", "3", "--resume")
    assert load_checkpoint(out)["seconds"] > 1000
    done = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert done["done"] and done["seconds"] > 1000


def test_resume_refuses_an_option_that_conflicts_with_the_run(tmp_path, capsys):
    out = tmp_path / "run"
    pretrain(out, "--steps", "2", "--mask-ratio", "0.4")
    before = (out / "checkpoint.pt").read_bytes()
    assert pretrain(out, "--steps", "3", "--resume", "--mask-ratio", "0.9") == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert "--mask-ratio 0.9 conflicts" in error and "0.4" in error
    assert (out / "checkpoint.pt").read_bytes() == before


def test_metrics_never_hold_a_step_twice_after_a_resume(tmp_path):
    out = tmp_path / "run"
    pretrain(out, "--steps", "2", "--log-every", "1")
    with open(out / "metrics.jsonl", "a") as f:  # logged after the last checkpoint
        f.write(json.dumps({"step": 3, "loss": -1.0}) + "\n")
    pretrain(out, "--steps", "4", "--log-every", "1", "--resume")
    steps = [r["step"] for r in read_metrics(out) if "loss" in r]
    assert steps == [1, 2, 3, 4]
    assert all(r["loss"] > 0 for r in read_metrics(out) if "loss" in r)


@pytest.mark.slow
def test_two_gloo_processes_under_torchrun_end_with_identical_parameters(tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    from tiny import RUN_DEFAULTS, tiny_cli_args

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "simmim_cli",
            "pretrain",
            "--out",
            str(out),
            *tiny_cli_args("vit"),
            *RUN_DEFAULTS,
            "--steps",
            "5",
            "--sim-loss",
            "contrastive",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == 2
    assert config["steps_per_epoch"] == 4  # 64 images / 2 ranks / 8
    # each rank hashes its parameters at the end; rank 0 reports that all hashes agree ...
    found = re.search(
        r"parameters identical on all 2 ranks \(sha256 ([0-9a-f]{64})\)", proc.stdout + proc.stderr
    )
    assert found, proc.stdout[-2000:] + proc.stderr[-2000:]
    # ... and the agreed hash is that of the checkpoint rank 0 wrote
    ckpt = load_checkpoint(out)
    assert ckpt["step"] == 5
    assert found.group(1) == state_digest(ckpt["model"])


def test_state_digest_sees_a_one_bit_change():
    model = tiny_model("vit")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = state_digest(state)
    flat = state["decoder.proj.bias"].view(torch.int32)
    flat[0] ^= 1
    assert state_digest(state) != before
    assert state_digest(model.state_dict()) == before


# ---- checkpoints -------------------------------------------------------------------------------


def test_checkpoint_is_written_to_a_temporary_file_then_renamed(tmp_path, monkeypatch):
    renames = []
    real_replace = os.replace
    monkeypatch.setattr(
        checkpoint_module.os,
        "replace",
        lambda src, dst: (renames.append((Path(src), Path(dst))), real_replace(src, dst)),
    )
    target = tmp_path / "checkpoint.pt"
    save_atomic({"format": 1, "x": torch.ones(2)}, target)
    [(src, dst)] = renames
    assert dst == target and src != target and src.parent == target.parent
    assert not src.exists() and target.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_a_failed_checkpoint_write_keeps_the_previous_checkpoint_and_leaves_no_temp_file(
    tmp_path, monkeypatch
):
    target = tmp_path / "checkpoint.pt"
    save_atomic({"format": 1, "step": 1}, target)

    def crash(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # killed while writing

    monkeypatch.setattr(checkpoint_module.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_atomic({"format": 1, "step": 2}, target)
    monkeypatch.undo()
    assert torch.load(target, weights_only=True)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_a_runs_checkpoint_loads_with_weights_only(tiny_run_dir):
    ckpt = torch.load(tiny_run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert {
        "model",
        "optimizer",
        "step",
        "model_config",
        "train_config",
        "preprocessing",
        "rng",
    } <= set(ckpt)
    assert ckpt["step"] == 2


def test_a_truncated_checkpoint_gives_checkpoint_error(tiny_run_dir, tmp_path):
    data = (tiny_run_dir / "checkpoint.pt").read_bytes()
    broken = tmp_path / "checkpoint.pt"
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(broken)


def test_a_missing_or_foreign_checkpoint_gives_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nothing.pt")
    torch.save({"weights": torch.ones(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a simmim checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_out_that_already_holds_a_run_fails_clearly_without_resume(tmp_path, capsys):
    out = tmp_path / "run"
    pretrain(out, "--steps", "1")
    before = (out / "checkpoint.pt").read_bytes()
    assert pretrain(out, "--steps", "1") == 2
    message = capsys.readouterr().err
    assert "already holds a run" in message and "--resume" in message
    assert (out / "checkpoint.pt").read_bytes() == before


# ---- the run's files ---------------------------------------------------------------------------


def test_a_run_writes_config_metrics_loss_curve_and_reconstruction_grid(tiny_run_dir):
    names = {p.name for p in tiny_run_dir.iterdir()}
    assert {
        "checkpoint.pt",
        "config.json",
        "metrics.jsonl",
        "loss_curve.png",
        "recon_epoch000.png",
    } <= names
    config = json.loads((tiny_run_dir / "config.json").read_text())
    assert {"model", "train", "preprocessing", "lr", "total_steps", "command"} <= set(config)
    rows = [json.loads(line) for line in (tiny_run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["done"] is True
    assert {"step", "lr", "loss", "rec", "sim", "img_per_s"} <= set(rows[0])
    curve = Image.open(tiny_run_dir / "loss_curve.png")
    assert curve.format == "PNG" and curve.width > 100


def test_reconstruction_grid_shows_original_masked_and_reconstruction_side_by_side(tiny_run_dir):
    config = json.loads((tiny_run_dir / "config.json").read_text())
    size = config["model"]["image_size"]
    scale = max(1, 96 // size)
    grid = Image.open(tiny_run_dir / "recon_epoch000.png")
    assert grid.format == "PNG"
    assert grid.size == (3 * size * scale, 8 * size * scale)  # 8 images, 3 panels


def test_a_picture_per_epoch(tmp_path):
    out = tmp_path / "run"
    pretrain(out, "--data", "synthetic:16", "--epochs", "2")  # 2 steps per epoch
    assert {"recon_epoch000.png", "recon_epoch001.png"} <= {p.name for p in out.iterdir()}
