"""`simmim pretrain`: SimMIM pretraining on one process, or many under torchrun (DDP)."""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from simmim_core.masking import MaskGenerator
from simmim_core.nn.model import ModelConfig, SimMIM
from simmim_core.preprocess import Preprocessing, preprocess
from simmim_core.visualize import reconstruction_grid

from .checkpoint import checkpoint_dict, load_checkpoint, save_atomic, state_digest
from .data import PretrainDataset, epoch_batches, open_dataset
from .loop import train_one_epoch
from .online_eval import OnlineKNN
from .options import MODEL_HELP, TRAIN_HELP, add_dataclass_options, apply_overrides
from .plots import loss_curve
from .presets import PRESETS, TrainConfig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="simmim pretrain",
        description="Pretrain a SimMIM encoder. Runs under torchrun for several processes "
        "(DistributedDataParallel, gloo on CPU, nccl on GPU). Every preset value can "
        "be overridden by the options below.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--preset",
        default="vit-tiny-fmnist",
        choices=sorted(PRESETS),
        help="named model + recipe: "
        + "; ".join(f"{k}: {v.description}" for k, v in PRESETS.items()),
    )
    p.add_argument(
        "--data",
        default="fashion-mnist",
        help="fashion-mnist, synthetic[:N] or a folder of images (recursive)",
    )
    p.add_argument(
        "--out",
        required=True,
        type=Path,
        help="run folder for checkpoints, config.json, metrics.jsonl and pictures",
    )
    p.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default=None,
        help="continue exactly from a checkpoint (default: RUN_DIR/checkpoint.pt)",
    )
    p.add_argument(
        "--save-every",
        type=int,
        default=0,
        help="also checkpoint every N optimizer steps (0: at each epoch end only)",
    )
    p.add_argument(
        "--eval-every",
        type=float,
        default=0,
        help="every N epochs (and before the first), kNN top-1 on a fixed labelled "
        "subset of the training data (10,000 bank and 2,000 query images), "
        "logged to metrics.jsonl and drawn in loss_curve.png; 0: off",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_dataclass_options(p, ModelConfig, MODEL_HELP, "model (overrides the preset)")
    add_dataclass_options(p, TrainConfig, TRAIN_HELP, "training recipe (overrides the preset)")
    return p


NO_DECAY_SUFFIXES = ("mask_token", "cls_token", "reg_token", "dist_token", "pos_embed")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay for biases, norms, tokens, position embeddings and Swin's relative position
    bias tables (1-d or named), as SimMIM's no_weight_decay() and no_weight_decay_keywords()."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = (
            p.ndim <= 1
            or name.endswith(NO_DECAY_SUFFIXES)
            or "relative_position_bias_table" in name
        )
        (no_decay if skip else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def eval_preprocessing(model_cfg: ModelConfig, train_cfg: TrainConfig) -> Preprocessing:
    """The preprocessing recorded for this run: resize the shorter side to image_size, crop."""
    color = "L" if model_cfg.in_chans == 1 else "RGB"
    return Preprocessing(
        color,
        model_cfg.image_size,
        model_cfg.image_size,
        train_cfg.interpolation,
        tuple(train_cfg.mean),
        tuple(train_cfg.std),
    )


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world, device); starts the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return dist.get_rank(), world, device
    return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")


def amp_dtype(mode: str, device: torch.device):
    if mode == "off":
        return None
    if mode == "bf16":
        return torch.bfloat16
    supported = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return torch.bfloat16 if supported else None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    preset = PRESETS[args.preset]
    model_cfg = apply_overrides(preset.model, args, MODEL_HELP)
    train_cfg = apply_overrides(preset.train, args, TRAIN_HELP)
    rank, world, device = init_distributed()
    out: Path = args.out
    resume_path = None
    if args.resume is not None:
        resume_path = out / "checkpoint.pt" if args.resume == "auto" else Path(args.resume)
    ckpt = load_checkpoint(resume_path) if resume_path else None
    if ckpt is not None:  # the run's own configuration wins over the preset
        model_cfg = ModelConfig(**ckpt["model_config"])
        saved = ckpt["train_config"]
        train_cfg = TrainConfig(
            **{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()}
        )
        train_cfg = apply_overrides(
            train_cfg, args, {k: 1 for k in ("steps", "epochs", "workers", "log_every")}
        )
    elif rank == 0 and (out / "checkpoint.pt").exists():
        sys.exit(
            f"simmim pretrain: {out} already holds a run; use --resume to continue it "
            "or choose another --out"
        )
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(train_cfg.seed)
    model = SimMIM(model_cfg).to(device)
    mask_gen = MaskGenerator(
        model_cfg.image_size,
        model_cfg.mask_patch_size,
        model.patch_size,
        model_cfg.mask_ratio,
        model_cfg.mask_kind,
    )
    source = open_dataset(args.data, "train")
    two_views = model_cfg.sim_loss in ("cosine", "contrastive")
    color = "L" if model_cfg.in_chans == 1 else "RGB"
    dataset = PretrainDataset(source, model_cfg.image_size, color, train_cfg, two_views)
    ddp_model = model
    if world > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    batch_total = train_cfg.batch_size * train_cfg.accum_steps * world
    lr = train_cfg.base_lr * batch_total / 512
    optimizer = torch.optim.AdamW(
        param_groups(model, train_cfg.weight_decay), lr=lr, betas=tuple(train_cfg.betas), eps=1e-8
    )
    steps_per_epoch = len(dataset) // world // train_cfg.batch_size // train_cfg.accum_steps
    if steps_per_epoch < 1:
        sys.exit(
            f"simmim pretrain: {len(dataset)} images are fewer than one step's batch "
            f"({batch_total}); lower --batch-size"
        )
    total_steps = train_cfg.steps or math.ceil(train_cfg.epochs * steps_per_epoch)
    warmup_steps = round(train_cfg.warmup_epochs * steps_per_epoch)
    step = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]
        torch.set_rng_state(ckpt["rng"]["torch"])
    spec = eval_preprocessing(model_cfg, train_cfg)
    if rank == 0:
        config = {
            "preset": args.preset,
            "data": args.data,
            "world_size": world,
            "device": str(device),
            "lr": lr,
            "steps_per_epoch": steps_per_epoch,
            "total_steps": total_steps,
            "model": model_cfg.to_dict(),
            "train": train_cfg.to_dict(),
            "preprocessing": spec.to_dict(),
            "images": len(dataset),
            "unreadable_images_skipped": source.skipped,
            "command": "simmim pretrain " + shlex.join(argv if argv is not None else sys.argv[1:]),
        }
        (out / "config.json").write_text(json.dumps(config, indent=2))
        print(
            f"pretraining {model_cfg.arch} on {len(dataset)} images ({source.skipped} "
            f"unreadable skipped), {total_steps} steps of {batch_total} images, lr {lr:.3g}, "
            f"{world} process(es) on {device}",
            flush=True,
        )
    bar = tqdm(
        total=total_steps,
        initial=step,
        disable=rank != 0 or args.no_progress,
        unit="step",
        dynamic_ncols=True,
    )
    if rank == 0:
        trim_metrics(out / "metrics.jsonl", step)
    metrics = open(out / "metrics.jsonl", "a") if rank == 0 else None
    online = OnlineKNN(source, spec, seed=train_cfg.seed) if args.eval_every and rank == 0 else None

    def evaluate_online(epoch: float) -> None:
        result = online(model, device)
        metrics.write(json.dumps({"step": step, "epoch": epoch, **result}) + "\n")
        metrics.flush()
        bar.write(
            f"epoch {epoch:g}: online kNN top-1 {result['knn_top1']:.4f} "
            f"(whitened {result['knn_top1_whitened']:.4f}, {result['eval_seconds']} s)"
        )

    if online is not None and step == 0:
        evaluate_online(0)
    started = time.time()

    def save(epoch: int) -> None:
        if rank != 0:
            return
        save_atomic(
            checkpoint_dict(model, optimizer, step, epoch, train_cfg, spec, args.data),
            out / "checkpoint.pt",
        )

    def on_step(s: int, parts: dict, step_lr: float, n_images: int, seconds: float) -> None:
        nonlocal step
        step = s
        bar.update(1)
        bar.set_postfix(loss=f"{parts['loss']:.4f}", lr=f"{step_lr:.2e}")
        if metrics and (s % train_cfg.log_every == 0 or s == total_steps):
            row = {
                "step": s,
                "epoch": s / steps_per_epoch,
                "lr": step_lr,
                "img_per_s": n_images * world / max(seconds, 1e-9),
                **parts,
            }
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
        if args.save_every and s % args.save_every == 0:
            save(s // steps_per_epoch)

    while step < total_steps:
        epoch, done_in_epoch = divmod(step, steps_per_epoch)
        dataset.epoch = epoch
        batches = epoch_batches(
            len(dataset), train_cfg.batch_size, train_cfg.seed, epoch, rank, world
        )[: steps_per_epoch * train_cfg.accum_steps]
        # its own generator: the loader's seed draw must not advance torch's global RNG, which
        # drop_path and noise filling use, or a resumed run would diverge from a straight one
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=batches[done_in_epoch * train_cfg.accum_steps :],
            num_workers=train_cfg.workers,
            pin_memory=device.type == "cuda",
            generator=torch.Generator().manual_seed(train_cfg.seed + epoch),
        )
        step = train_one_epoch(
            model,
            ddp_model,
            loader,
            optimizer,
            mask_gen,
            epoch=epoch,
            start_step=step,
            total_steps=total_steps,
            warmup_steps=warmup_steps,
            lr=lr,
            warmup_lr=train_cfg.warmup_lr,
            min_lr=train_cfg.min_lr,
            clip_grad=train_cfg.clip_grad,
            accum_steps=train_cfg.accum_steps,
            seed=train_cfg.seed,
            rank=rank,
            device=device,
            amp_dtype=amp_dtype(train_cfg.amp, device),
            on_step=on_step,
        )
        done_epochs = step / steps_per_epoch
        if online is not None and (step >= total_steps or _crossed(done_epochs, args.eval_every)):
            evaluate_online(round(done_epochs, 4))
        save(step // steps_per_epoch)
        if rank == 0:
            write_pictures(model, source, spec, mask_gen, out, epoch, device)
    bar.close()
    if metrics:
        metrics.write(
            json.dumps({"done": True, "steps": step, "seconds": round(time.time() - started, 1)})
            + "\n"
        )
        metrics.close()
    if world > 1:
        check_replicas_agree(model, rank, world)
        # DDP holds the process group: release it now, not at interpreter exit, where gloo's
        # threads could be destroyed still running (SIGABRT, "terminate called ...")
        del ddp_model
        dist.destroy_process_group()
    return 0


def _crossed(epochs: float, every: float) -> bool:
    """True when `epochs` (just completed) is a multiple of `every` (within rounding)."""
    return abs(epochs / every - round(epochs / every)) < 1e-6


def trim_metrics(path: Path, step: int) -> None:
    """Drop the lines logged after `step` (a resumed run logs them again), so that
    metrics.jsonl never holds a step twice."""
    if not path.exists():
        return
    rows = [json.loads(line) for line in path.read_text().splitlines() if line]
    keep = [json.dumps(r) for r in rows if "done" not in r and r.get("step", 0) <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)


def check_replicas_agree(model: torch.nn.Module, rank: int, world: int) -> None:
    """DDP keeps every replica identical; verify it bit for bit at the end of a run."""
    digests = [None] * world
    dist.all_gather_object(digests, state_digest(model.state_dict()))
    if len(set(digests)) != 1:
        raise RuntimeError(f"the {world} replicas ended with different parameters: {digests}")
    if rank == 0:
        print(f"parameters identical on all {world} ranks (sha256 {digests[0]})", flush=True)


@torch.no_grad()
def write_pictures(
    model: SimMIM,
    source,
    spec: Preprocessing,
    mask_gen: MaskGenerator,
    out: Path,
    epoch: int,
    device: torch.device,
    n: int = 8,
) -> None:
    """recon_epoch{E}.png for the first n images (fixed masks) and loss_curve.png."""
    pixels = preprocess([source.encoded(i) for i in range(min(n, len(source)))], spec)
    mask = mask_gen(np.random.default_rng(0), len(pixels))
    was_training = model.training
    model.eval()
    recon = (
        model.reconstruct(torch.from_numpy(pixels).to(device), torch.from_numpy(mask).to(device))
        .float()
        .cpu()
        .numpy()
    )
    model.train(was_training)
    scale = max(1, 96 // spec.crop_size)
    reconstruction_grid(pixels, mask, recon, spec, model.patch_size, scale).save(
        out / f"recon_epoch{epoch:03d}.png"
    )
    loss_curve(out / "metrics.jsonl", out / "loss_curve.png")


if __name__ == "__main__":
    sys.exit(main())
