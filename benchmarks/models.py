"""The models the benchmarks run: the embedded default model and a ViT-S/16 at 224.

Each is a model directory (what the service serves) plus the same network in PyTorch eager.
Built ones are cached in the work folder, so a second run starts at once.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from service.settings import default_model_path
from simmim_core.model_dir import ENCODER, ENCODER_INT8, load_model_dir

log = logging.getLogger("benchmarks.models")

VIT_S = dict(
    family="vit", arch="vit_small_patch16_224", image_size=224, in_chans=3, mask_patch_size=32
)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BenchModel:
    key: str  # "default" | "vit_s16"
    label: str  # for tables
    model_dir: Path
    checkpoint: Path | None  # the same weights for PyTorch; None: rebuilt from the card
    note: str  # where it came from

    @property
    def card(self) -> dict:
        return json.loads((self.model_dir / "model.json").read_text())

    @property
    def has_int8(self) -> bool:
        return ENCODER_INT8 in self.card["files"]

    def onnx(self, int8: bool) -> Path:
        return self.model_dir / (ENCODER_INT8 if int8 else ENCODER)

    def describe(self) -> dict:
        card = self.card
        return {
            "label": self.label,
            "model_dir": str(self.model_dir),
            "checkpoint": str(self.checkpoint) if self.checkpoint else None,
            "note": self.note,
            "name": card["name"],
            "arch": card["encoder"]["arch"],
            "parameters": card["encoder"]["parameters"],
            "image_size": card["image_size"],
            "in_chans": card["in_chans"],
            "embedding_dim": card["embedding_dim"],
            "pooling": card["pooling"],
            "training_data": card.get("training", {}).get("data"),
            "training_steps": card.get("training", {}).get("steps"),
            "int8_cosine_to_fp32": card.get("export", {}).get("int8"),
        }


def _simmim(*args: str) -> None:
    cmd = [sys.executable, "-m", "simmim_cli", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-2000:]}")


def training_checkpoint(card: dict) -> Path | None:
    """The checkpoint the model was exported from, if its run folder (the --out of the training
    command in model.json) is still on this machine."""
    words = (card.get("training", {}).get("command") or "").split()
    if "--out" in words[:-1]:
        path = Path(words[words.index("--out") + 1]) / "checkpoint.pt"
        if path.is_file():
            return path
    return None


def default_model(
    work: Path, model_dir: Path | None = None, checkpoint: Path | None = None
) -> BenchModel:
    """The embedded default model (service/default_model); when it is absent, a tiny model
    pretrained for 2 steps on synthetic images and exported, cached under `work`."""
    if model_dir is None and (default_model_path() / "model.json").is_file():
        model_dir = default_model_path()
    if model_dir is not None:
        card = load_model_dir(model_dir).card
        checkpoint = checkpoint or training_checkpoint(card)
        note = (
            f"{model_dir}: {card['encoder']['arch']} {card['encoder'].get('kwargs', {})}, "
            f"trained on {card.get('training', {}).get('data')} for "
            f"{card.get('training', {}).get('steps')} steps"
        )
        return BenchModel("default", "default model", Path(model_dir), checkpoint, note)
    run, out = work / "fallback_run", work / "fallback_model"
    if not (out / "model.json").is_file():
        log.info("no default model: pretraining a tiny fallback for 2 steps")
        _simmim(
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
        )
        _simmim("export", str(run), "--out", str(out), "--int8", "--no-progress")
    return BenchModel(
        "default",
        "default model (fallback)",
        out,
        run / "checkpoint.pt",
        "service/default_model absent: vit-tiny-fmnist preset pretrained 2 steps "
        "on synthetic:64 and exported with --int8",
    )


def vit_s16(work: Path) -> BenchModel:
    """A ViT-S/16 at 224 with random weights, saved as `simmim pretrain` saves a checkpoint and
    exported with int8 (about a minute the first time)."""
    ckpt, out = work / "vit_s16" / "checkpoint.pt", work / "vit_s16" / "model"
    if not (out / "model.json").is_file():
        import torch

        from simmim_core.nn.model import ModelConfig, SimMIM
        from simmim_core.preprocess import Preprocessing
        from training.checkpoint import checkpoint_dict, save_atomic
        from training.export import export_model_dir
        from training.presets import TrainConfig

        log.info("building a ViT-S/16 at 224 (random weights) and exporting it with int8")
        torch.manual_seed(0)
        model = SimMIM(ModelConfig(**VIT_S))
        spec = Preprocessing("RGB", 224, 224, "bicubic", IMAGENET_MEAN, IMAGENET_STD)
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        save_atomic(checkpoint_dict(model, None, 0, 0, TrainConfig(), spec, "synthetic:32"), ckpt)
        export_model_dir(ckpt, out, int8=True, name="vit_s16_224_random")
    return BenchModel(
        "vit_s16",
        "ViT-S/16 @224",
        out,
        ckpt,
        "vit_small_patch16_224, random weights (seed 0), exported with int8",
    )


def torch_encoder(model: BenchModel, device: str = "cpu"):
    """The model's encoder in PyTorch eager, in eval mode: its checkpoint's weights, or (the
    default model ships none) the architecture in model.json with random weights, which runs
    at the same speed. Returns (module with .embed, note)."""
    import torch

    from simmim_core.nn.model import ModelConfig, SimMIM
    from training.checkpoint import inference_model

    if model.checkpoint is not None and Path(model.checkpoint).exists():
        net, _ = inference_model(model.checkpoint, pooling=model.card["pooling"])  # as exported
        note = f"weights of {model.checkpoint}"
    else:
        card = model.card
        cfg = ModelConfig(
            family=card["encoder"]["family"],
            arch=card["encoder"]["arch"],
            image_size=card["image_size"],
            in_chans=card["in_chans"],
            encoder_kwargs=card["encoder"].get("kwargs", {}),
            mask_patch_size=card["mask_patch_size"],
            mask_ratio=card["mask_ratio"],
            pooling=card["pooling"],
            decoder=card.get("pretraining", {}).get("decoder", "linear"),
        )
        torch.manual_seed(0)
        net = SimMIM(replace(cfg, sim_loss="none")).eval()
        note = "the architecture in model.json, random weights (no checkpoint shipped)"
    return net.to(device), note
