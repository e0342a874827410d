"""The `simmim` command: help for every option, and each encoder family trains through it."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import TINY_ENCODERS, pretrain, read_metrics

import simmim_cli
from simmim_core.nn.model import ModelConfig
from training import evaluate as evaluate_module
from training import pretrain as pretrain_module
from training.checkpoint import load_checkpoint
from training.presets import TrainConfig

REPO = Path(__file__).resolve().parents[1]


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def help_text(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        simmim_cli.main([*argv, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def test_simmim_help_exits_0_and_lists_every_command():
    proc = subprocess.run(
        [sys.executable, "-m", "simmim_cli", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0
    for command in ("pretrain", "evaluate", "export", "serve"):
        assert command in proc.stdout


def test_simmim_without_a_command_prints_usage_and_exits_0(capsys):
    assert simmim_cli.main([]) == 0
    assert "pretrain" in capsys.readouterr().out


def test_an_unknown_command_exits_2_with_the_usage(capsys):
    assert simmim_cli.main(["train"]) == 2
    err = capsys.readouterr().err
    assert "'train'" in err and "pretrain" in err


def test_pretrain_help_exits_0_and_mentions_every_setting(capsys):
    text = help_text(capsys, "pretrain")
    fields = dataclasses.fields(ModelConfig) + dataclasses.fields(TrainConfig)
    for name in [f.name for f in fields] + [
        "preset",
        "data",
        "out",
        "resume",
        "save_every",
        "no_progress",
    ]:
        assert flag(name) in text, f"{flag(name)} missing from simmim pretrain --help"
    for preset in ("vit-tiny-fmnist", "vit-base-224", "swin-base-192"):
        assert preset in text


@pytest.mark.parametrize(
    "command, module", [("pretrain", pretrain_module), ("evaluate", evaluate_module)]
)
def test_every_option_of_a_subcommand_is_in_its_help_with_an_explanation(capsys, command, module):
    text = help_text(capsys, command)
    for action in module.build_parser()._actions:
        assert action.help, f"{action.option_strings} has no help text"
        for option in action.option_strings:
            assert option in text


def test_evaluate_help_exits_0_and_mentions_every_option(capsys):
    text = help_text(capsys, "evaluate")
    for option in (
        "--checkpoint",
        "--model-dir",
        "--pixels",
        "--data",
        "--test-data",
        "--int8",
        "--image-size",
        "--k",
        "--temperature",
        "--probe-epochs",
        "--batch-size",
        "--out",
        "--no-progress",
    ):
        assert option in text


def test_epochs_and_warmup_accept_fractions(tmp_path):
    args = pretrain_module.build_parser().parse_args(
        ["--out", str(tmp_path), "--epochs", "0.5", "--warmup-epochs", "0.25", "--steps", "3"]
    )
    assert (args.epochs, args.warmup_epochs, args.steps) == (0.5, 0.25, 3)


def test_encoder_kwargs_takes_a_json_object_and_rejects_anything_else(tmp_path, capsys):
    parser = pretrain_module.build_parser()
    args = parser.parse_args(["--out", str(tmp_path), "--encoder-kwargs", '{"depth": 2}'])
    assert args.encoder_kwargs == {"depth": 2}
    for bad in ("depth=2", "[2]"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--out", str(tmp_path), "--encoder-kwargs", bad])
        assert "--encoder-kwargs" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("family", list(TINY_ENCODERS))
def test_each_encoder_family_trains_a_few_steps_through_simmim_pretrain(tmp_path, family):
    out = tmp_path / family
    assert pretrain(out, "--steps", "3", family=family) == 0
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    ckpt = load_checkpoint(out)
    assert ckpt["step"] == 3
    assert ckpt["model_config"]["family"] == family
    assert ckpt["model_config"]["encoder_kwargs"] == TINY_ENCODERS[family]["encoder_kwargs"]
    assert (out / "recon_epoch000.png").exists()
