"""`simmim pretrain`: SimMIM pretraining on one process, or many under torchrun (DDP)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shlex
import shutil
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

from .checkpoint import CheckpointError, checkpoint_dict, load_checkpoint, save_atomic
from .data import AugmentedViews, epoch_batches, looks_colour, open_dataset
from .device import amp_dtype, check_replicas_agree, init_distributed
from .loop import train_one_epoch
from .online_eval import OnlineKNN
from .optim import param_groups
from .options import MODEL_HELP, TRAIN_HELP, add_dataclass_options, apply_overrides, given_options
from .plots import loss_curve
from .presets import DEFAULT_PRESET, PRESETS, TrainConfig
from .run_folder import HelpFormatter, MetricsLog, UsageError, crossed, resolve_data

# what may change when a run is resumed: the schedule's length, and how it is run
RESUME_MAY_CHANGE = ("epochs", "steps", "workers", "log_every")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="simmim pretrain",
        description="Pretrain a SimMIM encoder. Runs under torchrun for several processes "
        "(DistributedDataParallel, gloo on CPU, nccl on GPU). Every preset value can "
        "be overridden by the options below; a resumed run keeps its own.",
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--preset",
        default=None,
        choices=sorted(PRESETS),
        help=f"named model + recipe (default: {DEFAULT_PRESET}): "
        + "; ".join(f"{k}: {v.description}" for k, v in PRESETS.items()),
    )
    p.add_argument(
        "--data",
        default=None,
        help="fashion-mnist, synthetic[:N] or a folder of images (recursive; the "
        "first-level subfolders name classes for --eval-every) (default: "
        "fashion-mnist; a resumed run uses its own)",
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
        help="continue the run in --out exactly where it stopped, with its own data "
        "and configuration (or from the checkpoint file given); --epochs or --steps "
        "may extend its schedule, other options must agree with the run",
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
    add_dataclass_options(
        p,
        ModelConfig,
        MODEL_HELP,
        "model (overrides the preset)",
        {k: v.model for k, v in PRESETS.items()},
    )
    add_dataclass_options(
        p,
        TrainConfig,
        TRAIN_HELP,
        "training recipe (overrides the preset)",
        {k: v.train for k, v in PRESETS.items()},
    )
    return p


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


def saved_configs(ckpt: dict) -> tuple[ModelConfig, TrainConfig]:
    model_cfg = ModelConfig(**ckpt["model_config"])
    saved = ckpt["train_config"]
    train_cfg = TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})
    return model_cfg, train_cfg


def resumed_run(args, out: Path) -> tuple[dict, ModelConfig, TrainConfig, str, str]:
    """(checkpoint, model config, train config, data, preset) of the run to continue: its own,
    with the schedule options given; UsageError if any other option disagrees with it."""
    path = out / "checkpoint.pt" if args.resume == "auto" else Path(args.resume)
    if not path.is_file():
        raise UsageError(
            f"--resume: no checkpoint at {path}; start a new run without --resume, "
            "or give the --out of the run to continue"
        )
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as e:
        raise UsageError(str(e)) from None
    model_cfg, train_cfg = saved_configs(ckpt)
    config = (
        json.loads((out / "config.json").read_text()) if (out / "config.json").is_file() else {}
    )
    preset = config.get("preset", DEFAULT_PRESET)
    data = ckpt["data"]
    given = {**given_options(args, MODEL_HELP), **given_options(args, TRAIN_HELP)}
    if args.data is not None:
        given["data"] = resolve_data(args.data)
    if args.preset is not None:
        given["preset"] = args.preset
    saved = {**model_cfg.to_dict(), **train_cfg.to_dict(), "data": data, "preset": preset}
    for name, value in given.items():
        before = tuple(saved[name]) if isinstance(saved[name], list) else saved[name]
        if name not in RESUME_MAY_CHANGE and value != before:
            flag = "--" + name.replace("_", "-")
            raise UsageError(
                f"{flag} {value} conflicts with the run in {out} ({before}); a "
                "resumed run keeps its data and configuration: drop the option, "
                "or start a new run in another --out"
            )
    return (
        ckpt,
        model_cfg,
        apply_overrides(train_cfg, args, dict.fromkeys(RESUME_MAY_CHANGE)),
        data,
        preset,
    )


def fitting_batch_size(images: int, world: int, accum: int) -> int:
    """The largest power of two such that one step's batch fits in `images`."""
    per_process = max(1, images // world // accum)
    return 1 << (per_process.bit_length() - 1)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return pretrain(args, argv)
    except UsageError as e:
        print(f"simmim pretrain: {e}", file=sys.stderr)
        return 2


def pretrain(args, argv) -> int:
    rank, world, device = init_distributed()
    out: Path = args.out
    ckpt = None
    if args.resume is not None:
        ckpt, model_cfg, train_cfg, data, preset = resumed_run(args, out)
    else:
        preset = args.preset or DEFAULT_PRESET
        model_cfg = apply_overrides(PRESETS[preset].model, args, MODEL_HELP)
        train_cfg = apply_overrides(PRESETS[preset].train, args, TRAIN_HELP)
        data = resolve_data(args.data or "fashion-mnist")
        if (out / "checkpoint.pt").exists():
            raise UsageError(
                f"{out} already holds a run; use --resume to continue it or choose another --out"
            )
    if (train_cfg.steps is not None and train_cfg.steps < 1) or train_cfg.epochs <= 0:
        raise UsageError("--steps must be at least 1 and --epochs above 0")
    try:
        source = open_dataset(data, "train")
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None
    try:
        torch.manual_seed(train_cfg.seed)
        model = SimMIM(model_cfg).to(device)
        mask_gen = MaskGenerator(
            model_cfg.image_size,
            model_cfg.mask_patch_size,
            model.patch_size,
            model_cfg.mask_ratio,
            model_cfg.mask_kind,
        )
    except ValueError as e:
        raise UsageError(str(e)) from None
    if len(source) // world < train_cfg.batch_size * train_cfg.accum_steps:
        fit = fitting_batch_size(len(source), world, train_cfg.accum_steps)
        if ckpt is not None or args.batch_size is not None:
            raise UsageError(
                f"{len(source)} images are fewer than one step's batch "
                f"({train_cfg.batch_size * train_cfg.accum_steps * world}); use "
                f"--batch-size {fit} or add images"
            )
        if rank == 0:
            print(
                f"{len(source)} images: batch size lowered from {train_cfg.batch_size} to "
                f"{fit} so that one step fits (set --batch-size to choose)",
                flush=True,
            )
        train_cfg = dataclasses.replace(train_cfg, batch_size=fit)
    two_views = model_cfg.sim_loss in ("cosine", "contrastive")
    dataset = AugmentedViews(
        source,
        eval_preprocessing(model_cfg, train_cfg),
        train_cfg.crop_scale,
        train_cfg.crop_ratio,
        train_cfg.hflip,
        train_cfg.seed,
        two_views,
    )
    online = None
    if args.eval_every and rank == 0:
        try:
            online = OnlineKNN(
                source, eval_preprocessing(model_cfg, train_cfg), seed=train_cfg.seed
            )
        except ValueError as e:
            raise UsageError(f"--eval-every: {e}") from None
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        return _train(
            args,
            argv,
            out,
            ckpt,
            model,
            mask_gen,
            model_cfg,
            train_cfg,
            data,
            preset,
            source,
            dataset,
            online,
            rank,
            world,
            device,
        )
    except BaseException:
        if created and rank == 0 and not (out / "checkpoint.pt").exists():
            shutil.rmtree(out, ignore_errors=True)  # leave no empty run folder behind
        raise


def _train(
    args,
    argv,
    out,
    ckpt,
    model,
    mask_gen,
    model_cfg,
    train_cfg,
    data,
    preset,
    source,
    dataset,
    online,
    rank,
    world,
    device,
) -> int:
    """The training run proper, once every option has been checked."""
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
            "preset": preset,
            "data": data,
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
        colour = data not in ("fashion-mnist",) and model_cfg.in_chans == 1 and looks_colour(source)
        print(
            f"training a {model_cfg.in_chans}-channel {model_cfg.image_size} px model "
            f"(preset {preset})"
            + (
                "; your images are in colour: use --in-chans 3 "
                "--image-size 224 (or --preset vit-base-224) to keep "
                "colour"
                if colour
                else ""
            ),
            flush=True,
        )
        print(
            f"pretraining {model_cfg.arch} on {len(dataset)} images ({source.skipped} "
            f"unreadable skipped), {total_steps} steps of {batch_total} images, lr {lr:.3g}, "
            f"{world} process(es) on {device}" + (f", from step {step}" if step else ""),
            flush=True,
        )
    bar = tqdm(
        total=total_steps,
        initial=step,
        disable=rank != 0 or args.no_progress,
        unit="step",
        dynamic_ncols=True,
    )
    metrics = MetricsLog(out / "metrics.jsonl", step) if rank == 0 else None

    def evaluate_online(epoch: float) -> None:
        result = online(model, device)
        metrics.write({"step": step, "epoch": epoch, **result})
        bar.write(
            f"epoch {epoch:g}: online kNN top-1 {result['knn_top1']:.4f} "
            f"(whitened {result['knn_top1_whitened']:.4f}, {result['eval_seconds']} s)"
        )

    if online is not None and step == 0:
        evaluate_online(0)
    started = time.time() - (ckpt or {}).get("seconds", 0.0)  # earlier parts of a resumed run

    def save(epoch: int) -> None:
        if rank == 0:
            save_atomic(
                checkpoint_dict(
                    model, optimizer, step, epoch, train_cfg, spec, data, time.time() - started
                ),
                out / "checkpoint.pt",
            )

    def on_step(s: int, parts: dict, step_lr: float, n_images: int, seconds: float) -> None:
        nonlocal step
        step = s
        bar.update(1)
        bar.set_postfix(loss=f"{parts['loss']:.4f}", lr=f"{step_lr:.2e}")
        if metrics and (s % train_cfg.log_every == 0 or s == total_steps):
            metrics.write(
                {
                    "step": s,
                    "epoch": s / steps_per_epoch,
                    "lr": step_lr,
                    "img_per_s": n_images * world / max(seconds, 1e-9),
                    **parts,
                }
            )
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
        if online is not None and (step >= total_steps or crossed(done_epochs, args.eval_every)):
            evaluate_online(round(done_epochs, 4))
        save(step // steps_per_epoch)
        if rank == 0:
            write_pictures(model, source, spec, mask_gen, out, epoch, device)
    bar.close()
    if metrics:
        metrics.write({"done": True, "steps": step, "seconds": round(time.time() - started, 1)})
        metrics.close()
    if world > 1:
        check_replicas_agree(model, rank, world)
        # DDP holds the process group: release it now, not at interpreter exit, where gloo's
        # threads could be destroyed still running (SIGABRT, "terminate called ...")
        del ddp_model
        dist.destroy_process_group()
    return 0


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
