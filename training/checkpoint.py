"""Checkpoints as plain dicts (loadable with weights_only=True), written atomically."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch

CHECKPOINT_FORMAT = 1


def save_atomic(obj: dict, path: Path) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def checkpoint_dict(
    model,
    optimizer,
    step: int,
    epoch: int,
    train_cfg,
    preprocessing,
    data: str,
    seconds: float = 0.0,
) -> dict:
    """What `simmim pretrain` saves: plain tensors, numbers, strings and dicts only. seconds:
    the run's wall time so far, every resumed part included."""
    return {
        "format": CHECKPOINT_FORMAT,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else {},
        "step": step,
        "epoch": epoch,
        "model_config": model.cfg.to_dict(),
        "train_config": train_cfg.to_dict(),
        "preprocessing": preprocessing.to_dict(),
        "data": data,
        "seconds": seconds,
        "rng": {"torch": torch.get_rng_state()},
    }


def state_digest(state: dict) -> str:
    """sha256 of a state dict's names, dtypes, shapes and exact bytes (same bits, same digest)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name} {t.dtype} {tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated or not one of ours."""


def load_checkpoint(path) -> dict:
    """Load a checkpoint written by `simmim pretrain`; a run folder means its checkpoint.pt."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError...
        raise CheckpointError(
            f"checkpoint {path} is unreadable or truncated ({type(e).__name__})"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is not a simmim checkpoint (format {CHECKPOINT_FORMAT} expected)"
        )
    return ckpt


def inference_model(checkpoint, **features):
    """(SimMIM in eval mode, checkpoint dict) without the training-only heads (projection, EMA,
    a fine-tuning classifier).

    features: pooling, feature_layer, feature_norm overriding the checkpoint's (None: keep);
    they choose which features are the embedding and have no weights of their own.
    Raises CheckpointError when the weights do not fit the recorded architecture.
    """
    from dataclasses import replace

    from simmim_core.nn.model import ModelConfig, SimMIM

    ckpt = load_checkpoint(checkpoint)
    try:
        cfg = ModelConfig(**ckpt["model_config"])
        given = {k: v for k, v in features.items() if v is not None}
        cfg = replace(cfg, sim_loss="none", **given)
        model = SimMIM(cfg)
        state = {
            k: v for k, v in ckpt["model"].items() if not k.startswith(("proj.", "ema_encoder."))
        }
        model.load_state_dict(state)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(
            f"checkpoint {checkpoint} does not match its architecture: {first[:200]}"
        ) from None
    return model.eval(), ckpt
