"""`simmim finetune`: SimMIM's second stage, supervised fine-tuning of a pretrained encoder.

A linear head on the pooled features (mean of the patch tokens by default), layer-wise lr
decay, drop path, label smoothing, linear warmup then cosine, RandomResizedCrop and flip; the
paper's RandAugment, mixup and cutmix are not implemented. The decoder is frozen while the
encoder changes, then refitted on the fine-tuned encoder (the encoder frozen), so that
/reconstruct still shows what the fine-tuned encoder keeps. `simmim export` of the result
serves the pre-logits features (the pooled embedding) and records the labels in model.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from simmim_core.masking import MaskGenerator
from simmim_core.nn.model import SimMIM
from simmim_core.preprocess import Preprocessing, preprocess

from .checkpoint import CheckpointError, inference_model, load_checkpoint, save_atomic
from .data import AugmentedViews, epoch_batches
from .device import amp_dtype
from .evaluate import split_labeled
from .loop import finetune_one_epoch, train_one_epoch
from .online_eval import OnlineKNN
from .optim import layer_decay_groups, param_groups
from .options import add_dataclass_options, apply_overrides, given_options
from .plots import loss_curve
from .pretrain import write_pictures
from .run_folder import (
    HelpFormatter,
    MetricsLog,
    UsageError,
    crossed,
    pretraining_info,
    resolve_data,
)


@dataclass
class FinetuneConfig:
    """The fine-tuning recipe; defaults follow SimMIM's ViT-B fine-tuning, scaled to a run."""

    epochs: float = 100
    batch_size: int = 128
    base_lr: float = 1.25e-3  # lr = base_lr * batch_size / 512
    warmup_epochs: float = 20
    warmup_lr: float = 2.5e-7
    min_lr: float = 2.5e-7
    weight_decay: float = 0.05
    layer_decay: float | None = None  # None: 0.65 for ViT, 0.9 for Swin, 1.0 otherwise
    drop_path: float = 0.1
    label_smoothing: float = 0.1
    clip_grad: float = 5.0
    pooling: str = "mean"
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True
    refit_decoder_epochs: float = 1
    amp: str = "auto"
    workers: int = 2
    seed: int = 0
    log_every: int = 20

    def to_dict(self) -> dict:
        return asdict(self)


HELP = {
    "epochs": "epochs to fine-tune (fractions allowed)",
    "batch_size": "images per optimizer step",
    "base_lr": "learning rate per 512 images; lr = base_lr * batch size / 512",
    "warmup_epochs": "epochs of linear warmup from --warmup-lr",
    "warmup_lr": "learning rate at the start of warmup",
    "min_lr": "final learning rate of the cosine schedule",
    "weight_decay": "AdamW weight decay (not on biases, norms, tokens, position embeddings)",
    "layer_decay": "layer-wise lr decay: block k of L learns at lr * decay^(L + 1 - k), the "
    "head at lr (default: 0.65 for ViT and 0.9 for Swin, the paper's ViT-B and Swin-B values; "
    "1.0 for CNNs)",
    "drop_path": "stochastic depth rate of the encoder's blocks",
    "label_smoothing": "label smoothing of the cross-entropy",
    "clip_grad": "gradient norm clipping (0 disables)",
    "pooling": "features the head reads and the export serves: mean, cls (ViT) or gridK",
    "crop_scale": "RandomResizedCrop area range, two numbers",
    "crop_ratio": "RandomResizedCrop aspect range, two numbers",
    "hflip": "random horizontal flip (true/false)",
    "refit_decoder_epochs": "afterwards, epochs of SimMIM reconstruction training of the "
    "decoder alone on the fine-tuned encoder (0: keep the pretrained decoder)",
    "amp": "mixed precision: auto (bf16 on a CUDA device that supports it), bf16 or off",
    "workers": "data loader worker processes",
    "seed": "seed for the head, data order, augmentation and drop path",
    "log_every": "optimizer steps between lines of metrics.jsonl",
}
RESUME_MAY_CHANGE = ("epochs", "workers", "log_every")


class Classifier(torch.nn.Module):
    """pixels [N, C, H, W] -> logits [N, K]: a linear head on SimMIM.embed (the pre-logits)."""

    def __init__(self, simmim: SimMIM, classes: int):
        super().__init__()
        self.simmim = simmim
        self.head = torch.nn.Linear(simmim.embedding_dim, classes)
        torch.nn.init.trunc_normal_(self.head.weight, std=2e-5)
        torch.nn.init.zeros_(self.head.bias)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.simmim.embed(pixels))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="simmim finetune",
        description="Fine-tune a pretrained (or imported) run on labelled images: a linear "
        "head on the pooled features, layer-wise lr decay, drop path, label smoothing, warmup "
        "then cosine, RandomResizedCrop and flip. Writes a run folder that simmim export and "
        "simmim evaluate accept. One process (no torchrun).",
        formatter_class=HelpFormatter,
    )
    p.add_argument("run", type=Path, help="the pretrained run folder (or its checkpoint.pt)")
    p.add_argument(
        "--data",
        default=None,
        help="labelled data: fashion-mnist, or a folder with one subfolder per "
        "class (default: fashion-mnist; a resumed run uses its own)",
    )
    p.add_argument(
        "--test-data",
        help="a test folder with the same classes, scored every "
        "--eval-every epochs (default: fashion-mnist's test split; for a folder, "
        "a seeded 10%% of it, held out of training)",
    )
    p.add_argument("--out", type=Path, required=True, help="run folder to write")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the fine-tuning in --out exactly where it stopped; --epochs "
        "may extend it, other options must agree with it",
    )
    p.add_argument(
        "--eval-every",
        type=float,
        default=1,
        help="every N epochs, top-1 on the test split and online kNN of the "
        "features, logged to metrics.jsonl and drawn in loss_curve.png; 0: only at "
        "the end",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    defaults = FinetuneConfig()
    add_dataclass_options(p, FinetuneConfig, HELP, "fine-tuning recipe", {"default": defaults})
    return p


def default_layer_decay(family: str) -> float:
    return {"vit": 0.65, "swin": 0.9}.get(family, 1.0)


def block_depths(simmim: SimMIM) -> list[int]:
    """Blocks per stage: [depth] for a ViT, the stage depths for a Swin, [] otherwise."""
    enc = simmim.encoder
    if simmim.cfg.family == "vit":
        return [enc.depth]
    if simmim.cfg.family == "swin":
        return [len(layer.blocks) for layer in enc.swin.layers]
    return []


@torch.no_grad()
def top1(model: Classifier, source, spec: Preprocessing, device, batch_size: int = 512) -> float:
    """Classification top-1 of `model` on every labelled image of `source`."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(source), batch_size):
        idx = range(start, min(start + batch_size, len(source)))
        pixels = torch.from_numpy(preprocess([source.encoded(i) for i in idx], spec)).to(device)
        correct += int((model(pixels).argmax(1).cpu().numpy() == source.labels[idx]).sum())
    model.train(was_training)
    return correct / len(source)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return finetune(args, argv)
    except UsageError as e:
        print(f"simmim finetune: {e}", file=sys.stderr)
        return 2


def saved_finetune(args, out: Path) -> tuple[dict, FinetuneConfig, str]:
    """The fine-tuning to continue, with --epochs applied; UsageError on a conflict."""
    if not (out / "checkpoint.pt").is_file():
        raise UsageError(
            f"--resume: no checkpoint in {out}; start without --resume, or give "
            "the --out of the fine-tuning to continue"
        )
    ckpt = load_checkpoint(out)
    if "finetune" not in ckpt:
        raise UsageError(
            f"--resume: {out} holds a pretraining run, not a fine-tuning; give another --out"
        )
    saved = ckpt["finetune"]["config"]
    cfg = FinetuneConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})
    given = given_options(args, HELP)
    if args.data is not None:
        given["data"] = resolve_data(args.data)
    before_all = {**saved, "data": ckpt["finetune"]["data"]}
    for name, value in given.items():
        before = before_all[name]
        before = tuple(before) if isinstance(before, list) else before
        if name not in RESUME_MAY_CHANGE and value != before:
            raise UsageError(
                f"--{name.replace('_', '-')} {value} conflicts with the "
                f"fine-tuning in {out} ({before}); a resumed run keeps its data and "
                "configuration"
            )
    cfg = apply_overrides(cfg, args, dict.fromkeys(RESUME_MAY_CHANGE))
    return ckpt, cfg, ckpt["finetune"]["data"]


def finetune(args, argv) -> int:
    out: Path = args.out
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resumed = None
    if args.resume:
        resumed, cfg, data = saved_finetune(args, out)
        run = Path(resumed["finetune"]["from"])
    else:
        if (out / "checkpoint.pt").exists():
            raise UsageError(
                f"{out} already holds a run; use --resume to continue it or choose another --out"
            )
        cfg = apply_overrides(FinetuneConfig(), args, HELP)
        data = resolve_data(args.data or "fashion-mnist")
        run = args.run
    try:
        pretrained = load_checkpoint(run)
        simmim, _ = inference_model(run, pooling=cfg.pooling)
    except (CheckpointError, ValueError) as e:
        raise UsageError(str(e)) from None
    try:
        bank_src, test_src = split_labeled(data, args.test_data, holdout=0.1)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None
    if len(np.unique(bank_src.labels)) < 2:
        raise UsageError(f"--data {data}: fine-tuning needs labels, one subfolder per class")
    spec = Preprocessing.from_dict(pretrained["preprocessing"])
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        return _train(
            args,
            argv,
            out,
            run,
            pretrained,
            resumed,
            simmim,
            cfg,
            data,
            bank_src,
            test_src,
            spec,
            device,
        )
    except BaseException:
        if created and not (out / "checkpoint.pt").exists():
            shutil.rmtree(out, ignore_errors=True)  # leave no empty run folder behind
        raise


def _train(
    args, argv, out, run, pretrained, resumed, simmim, cfg, data, source, test_src, spec, device
) -> int:
    torch.manual_seed(cfg.seed)
    model_cfg = simmim.cfg
    # drop path has no weights: the encoder is rebuilt with it, and the same state loaded
    kwargs = {**model_cfg.encoder_kwargs}
    if model_cfg.family in ("vit", "swin"):
        kwargs["drop_path_rate"] = cfg.drop_path
    train_cfg = dataclasses.replace(model_cfg, encoder_kwargs=kwargs)
    state = simmim.state_dict()
    simmim = SimMIM(train_cfg)
    simmim.load_state_dict(state)
    classes = list(source.classes)
    model = Classifier(simmim, len(classes)).to(device)
    simmim.decoder.requires_grad_(False)  # refitted afterwards
    decay = (
        cfg.layer_decay if cfg.layer_decay is not None else default_layer_decay(model_cfg.family)
    )
    depths = block_depths(simmim)
    groups = (
        layer_decay_groups(model, cfg.weight_decay, decay, depths)
        if depths
        else param_groups(model, cfg.weight_decay)
    )
    lr = cfg.base_lr * cfg.batch_size / 512
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)
    steps_per_epoch = len(source) // cfg.batch_size
    if steps_per_epoch < 1:
        raise UsageError(
            f"{len(source)} images are fewer than one batch; use --batch-size "
            f"{1 << (max(1, len(source)).bit_length() - 1)}"
        )
    total_steps = math.ceil(cfg.epochs * steps_per_epoch)
    warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
    step = 0
    if resumed is not None:
        model.simmim.load_state_dict(resumed["model"])
        model.head.load_state_dict(resumed["head"])
        optimizer.load_state_dict(resumed["optimizer"])
        step = resumed["step"]
        torch.set_rng_state(resumed["rng"]["torch"])
    finetune_info = {
        "from": str(Path(run).resolve()),
        "data": data,
        "classes": classes,
        "labels": f"{data} (training split, {len(source)} images)",
        "config": cfg.to_dict(),
        "layer_decay": decay,
        "pretraining": pretraining_info(Path(run), pretrained),
    }
    config = {
        "finetune": finetune_info,
        "model": model_cfg.to_dict(),
        "preprocessing": spec.to_dict(),
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
        "lr": lr,
        "images": len(source),
        "world_size": 1,
        "device": str(device),
        "command": "simmim finetune " + shlex.join(argv if argv is not None else sys.argv[1:]),
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    print(
        f"fine-tuning {model_cfg.arch} from {run} on {len(source)} images of "
        f"{len(classes)} classes, {total_steps} steps of {cfg.batch_size}, lr {lr:.3g}, "
        f"layer decay {decay}" + (f", from step {step}" if step else ""),
        flush=True,
    )
    dataset = AugmentedViews(
        source, spec, cfg.crop_scale, cfg.crop_ratio, cfg.hflip, cfg.seed, labels=True
    )
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    online = OnlineKNN(source, spec, seed=cfg.seed)
    metrics = MetricsLog(out / "metrics.jsonl", step)
    bar = tqdm(
        total=total_steps, initial=step, disable=args.no_progress, unit="step", dynamic_ncols=True
    )
    started = time.time() - (resumed or {}).get("seconds", 0.0)  # earlier parts of a resumed run

    def checkpoint(epoch: int, test_top1: float | None = None) -> dict:
        info = {**finetune_info, **({"test_top1": test_top1} if test_top1 is not None else {})}
        return {
            "format": 1,
            "model": model.simmim.state_dict(),
            "head": model.head.state_dict(),
            "optimizer": optimizer.state_dict(),
            "step": step,
            "epoch": epoch,
            # the weights' similarity term, which the inference model (model_cfg) drops
            "model_config": model_cfg.to_dict()
            | {"sim_loss": pretrained["model_config"]["sim_loss"]},
            "train_config": pretrained["train_config"],
            "preprocessing": spec.to_dict(),
            "data": pretrained["data"],
            "finetune": info,
            "seconds": time.time() - started,
            "rng": {"torch": torch.get_rng_state()},
            **({"imported": pretrained["imported"]} if "imported" in pretrained else {}),
        }

    def evaluate(epoch: float) -> float:
        accuracy = top1(model, test_src, spec, device)
        knn = online(model.simmim, device)
        metrics.write(
            {
                "step": step,
                "epoch": epoch,
                "val_top1": accuracy,
                "knn_top1": knn["knn_top1"],
                "knn_top1_whitened": knn["knn_top1_whitened"],
                "whitened_dim": knn["whitened_dim"],
            }
        )
        bar.write(
            f"epoch {epoch:g}: test top-1 {accuracy:.4f}, online kNN of the features "
            f"{knn['knn_top1']:.4f}"
        )
        return accuracy

    def on_step(s: int, parts: dict, step_lr: float, n: int, seconds: float) -> None:
        nonlocal step
        step = s
        bar.update(1)
        bar.set_postfix(loss=f"{parts['loss']:.3f}", lr=f"{step_lr:.2e}")
        if s % cfg.log_every == 0 or s == total_steps:
            metrics.write(
                {
                    "step": s,
                    "epoch": s / steps_per_epoch,
                    "lr": step_lr,
                    "img_per_s": n / max(seconds, 1e-9),
                    **parts,
                }
            )

    accuracy = None
    while step < total_steps:
        epoch, done_in_epoch = divmod(step, steps_per_epoch)
        dataset.epoch = epoch
        batches = epoch_batches(len(dataset), cfg.batch_size, cfg.seed, epoch)
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=batches[done_in_epoch:],
            num_workers=cfg.workers,
            generator=torch.Generator().manual_seed(cfg.seed + epoch),
        )
        step = finetune_one_epoch(
            model,
            loader,
            optimizer,
            criterion,
            epoch=epoch,
            start_step=step,
            total_steps=total_steps,
            warmup_steps=warmup_steps,
            lr=lr,
            warmup_lr=cfg.warmup_lr,
            min_lr=cfg.min_lr,
            clip_grad=cfg.clip_grad,
            device=device,
            amp_dtype=amp_dtype(cfg.amp, device),
            on_step=on_step,
        )
        done = step / steps_per_epoch
        if step >= total_steps or (args.eval_every and crossed(done, args.eval_every)):
            accuracy = evaluate(round(done, 4))
        save_atomic(checkpoint(step // steps_per_epoch), out / "checkpoint.pt")
        loss_curve(out / "metrics.jsonl", out / "loss_curve.png")
    bar.close()
    if accuracy is None:  # resumed after the last step
        accuracy = top1(model, test_src, spec, device)
    if cfg.refit_decoder_epochs > 0 and "decoder_refit" not in (resumed or {}).get("finetune", {}):
        refit_decoder(model.simmim, source, spec, cfg, device, not args.no_progress)
    final = checkpoint(step // steps_per_epoch, accuracy)
    final["finetune"]["decoder_refit"] = {"epochs": cfg.refit_decoder_epochs}
    save_atomic(final, out / "checkpoint.pt")
    mask_gen = MaskGenerator(
        model_cfg.image_size, model_cfg.mask_patch_size, simmim.patch_size, model_cfg.mask_ratio
    )
    write_pictures(model.simmim, test_src, spec, mask_gen, out, 0, device)
    (out / "recon_epoch000.png").rename(out / "recon_finetuned.png")
    metrics.write(
        {
            "done": True,
            "steps": step,
            "test_top1": accuracy,
            "seconds": round(time.time() - started, 1),
        }
    )
    metrics.close()
    print(f"test top-1 {accuracy:.4f} ({len(test_src)} images); wrote {out}")
    return 0


def refit_decoder(
    simmim: SimMIM, source, spec: Preprocessing, cfg: FinetuneConfig, device, progress: bool
) -> None:
    """Train the decoder alone (encoder frozen) with SimMIM's masked reconstruction loss on the
    fine-tuned encoder's features, for cfg.refit_decoder_epochs epochs."""
    mcfg = simmim.cfg
    simmim.encoder.requires_grad_(False)
    simmim.decoder.requires_grad_(True)
    mask_gen = MaskGenerator(
        mcfg.image_size, mcfg.mask_patch_size, simmim.patch_size, mcfg.mask_ratio, mcfg.mask_kind
    )
    dataset = AugmentedViews(source, spec, (0.67, 1.0), (3 / 4, 4 / 3), True, cfg.seed + 1)
    steps_per_epoch = len(source) // cfg.batch_size
    total = max(1, math.ceil(cfg.refit_decoder_epochs * steps_per_epoch))
    lr = 1e-3 * cfg.batch_size / 256
    optimizer = torch.optim.AdamW(simmim.decoder.parameters(), lr=lr, weight_decay=0.0)
    bar = tqdm(
        total=total, disable=not progress, unit="step", desc="refit decoder", dynamic_ncols=True
    )
    step = 0
    while step < total:
        epoch = step // steps_per_epoch
        dataset.epoch = epoch
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=epoch_batches(len(dataset), cfg.batch_size, cfg.seed + 1, epoch),
            num_workers=cfg.workers,
        )
        step = train_one_epoch(
            simmim,
            simmim,
            loader,
            optimizer,
            mask_gen,
            epoch=epoch,
            start_step=step,
            total_steps=total,
            warmup_steps=0,
            lr=lr,
            warmup_lr=lr,
            min_lr=lr * 0.1,
            clip_grad=0.0,
            accum_steps=1,
            seed=cfg.seed + 1,
            device=device,
            amp_dtype=None,
            on_step=lambda *a: bar.update(1),
        )
    bar.close()
    simmim.encoder.requires_grad_(True)
    simmim.eval()


if __name__ == "__main__":
    sys.exit(main())
