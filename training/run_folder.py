"""What a training command shares about its run folder and its command line: one-line usage
errors, data specs resolved once, metrics.jsonl that never holds a step twice, and help that
shows the preset's values."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


class UsageError(Exception):
    """A mistake on the command line: printed as one line, exit status 2, no traceback."""


def resolve_data(spec: str) -> str:
    """A data SPEC with a folder turned into its absolute path (so that a run, resumed or
    exported from elsewhere, finds it); UsageError for a folder that is not there."""
    name = spec.partition(":")[0]
    if name in ("fashion-mnist", "synthetic"):
        return spec
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise UsageError(
            f"--data {spec}: no such folder (give a folder of images, "
            "fashion-mnist or synthetic[:N])"
        )
    return str(path.resolve())


def run_info(checkpoint: Path, ckpt: dict) -> dict:
    """How the checkpoint (a run folder or its checkpoint.pt) was made: its data, steps, epochs
    and recipe, and from the run folder's config.json and metrics.jsonl, its command, images,
    processes, device and duration."""
    run = checkpoint if checkpoint.is_dir() else checkpoint.parent
    info = {
        "data": ckpt.get("data"),
        "steps": ckpt.get("step"),
        "epochs": ckpt.get("epoch"),
        "seed": ckpt["train_config"].get("seed"),
        "train_config": ckpt["train_config"],
    }
    if (run / "config.json").is_file():
        config = json.loads((run / "config.json").read_text())
        info.update(
            command=config.get("command"),
            images=config.get("images"),
            world_size=config.get("world_size"),
            device=config.get("device"),
        )
    if (run / "metrics.jsonl").is_file():
        done = [
            json.loads(line)
            for line in (run / "metrics.jsonl").read_text().splitlines()
            if '"done"' in line
        ]
        if done:
            info["duration_s"] = done[-1]["seconds"]
    return info


def pretraining_info(checkpoint: Path, ckpt: dict) -> dict:
    """How the checkpoint's weights were pretrained: its own run_info, or for a fine-tuned
    checkpoint the pretraining run's, as its fine-tuning recorded it when it began (only the
    data and recipe for a fine-tuning made before it did)."""
    finetune = ckpt.get("finetune")
    if not finetune:
        return run_info(checkpoint, ckpt)
    return finetune.get("pretraining") or {
        "data": ckpt.get("data"),
        "train_config": ckpt["train_config"],
    }


def crossed(epochs: float, every: float) -> bool:
    """True when `epochs` (just completed) is a multiple of `every` (within rounding)."""
    return abs(epochs / every - round(epochs / every)) < 1e-6


class MetricsLog:
    """metrics.jsonl, one JSON object per line. Opening it at `step` drops the lines logged after
    that step (a resumed run logs them again) and the previous run's closing line."""

    def __init__(self, path: Path, step: int):
        if path.exists():
            rows = [json.loads(line) for line in path.read_text().splitlines() if line]
            keep = [r for r in rows if "done" not in r and r.get("step", 0) <= step]
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
            tmp.replace(path)
        self._file = open(path, "a")

    def write(self, row: dict) -> None:
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows '(default: X)' only for options with a real default; preset-backed options say
    their preset values in their own help."""

    def _get_help_string(self, action):
        if action.default is None or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)
