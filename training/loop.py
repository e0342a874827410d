"""One epoch of training: SimMIM pretraining, and supervised fine-tuning."""

from __future__ import annotations

import math
import time
from contextlib import nullcontext

import numpy as np
import torch

from simmim_core.masking import MaskGenerator

from .schedule import lr_at


class NonFiniteLoss(RuntimeError):
    pass


def train_one_epoch(
    model,
    ddp_model,
    loader,
    optimizer,
    mask_gen: MaskGenerator,
    *,
    epoch: int,
    start_step: int,
    total_steps: int,
    warmup_steps: int,
    lr: float,
    warmup_lr: float,
    min_lr: float,
    clip_grad: float,
    accum_steps: int,
    seed: int,
    rank: int = 0,
    device: torch.device,
    amp_dtype,
    on_step,
) -> int:
    """Train until the loader ends or `total_steps` optimizer steps are done; returns the step.

    `loader` yields micro-batches (view1,) or (view1, view2); a mask batch is drawn per
    micro-batch from rng(seed, step, micro) (micro: its index within the step) plus the rank when
    it is > 0, so that ranks draw different masks and a resumed run draws the same ones.
    `on_step(step, parts, lr, n_images, seconds)` is called after every optimizer step.
    """
    step = start_step
    micro = 0
    sums, images, t0 = None, 0, time.perf_counter()
    model.train()
    for views in loader:
        if step >= total_steps:
            break
        pixels = views[0].to(device, non_blocking=True)
        target = views[1].to(device, non_blocking=True) if len(views) > 1 else None
        rng = np.random.default_rng(
            [seed, step, micro % accum_steps, 11] + ([rank] if rank else [])
        )
        mask = torch.from_numpy(mask_gen(rng, pixels.shape[0])).to(device)
        sync = (micro + 1) % accum_steps == 0
        no_sync = ddp_model.no_sync if (not sync and hasattr(ddp_model, "no_sync")) else nullcontext
        with (
            no_sync(),
            torch.autocast(
                device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
            ),
        ):
            loss, parts, _ = ddp_model(pixels, mask, target)
            if not math.isfinite(loss.item()):
                raise NonFiniteLoss(
                    f"loss is {loss.item()} at step {step} (epoch {epoch}); "
                    "stopping. Lower the lr or lengthen the warmup."
                )
            (loss / accum_steps).backward()
        sums = parts if sums is None else {k: sums[k] + v for k, v in parts.items()}
        images += pixels.shape[0]
        micro += 1
        if not sync:
            continue
        step_lr = lr_at(step, total_steps, warmup_steps, lr, warmup_lr, min_lr)
        for group in optimizer.param_groups:
            group["lr"] = step_lr * group.get("lr_scale", 1.0)
        if clip_grad:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.update_ema()
        step += 1
        on_step(
            step,
            {k: float(v) / accum_steps for k, v in sums.items()},
            step_lr,
            images,
            time.perf_counter() - t0,
        )
        sums, images, t0 = None, 0, time.perf_counter()
    return step


def finetune_one_epoch(
    model,
    loader,
    optimizer,
    criterion,
    *,
    epoch: int,
    start_step: int,
    total_steps: int,
    warmup_steps: int,
    lr: float,
    warmup_lr: float,
    min_lr: float,
    clip_grad: float,
    device: torch.device,
    amp_dtype,
    on_step,
) -> int:
    """Fine-tune until the loader ends or `total_steps` are done; returns the step.

    `loader` yields (pixels [B, C, H, W], labels [B]); `model(pixels)` gives logits [B, K].
    Each parameter group's lr is the scheduled lr times its `lr_scale` (layer-wise decay).
    `on_step(step, {'loss', 'top1'}, lr, n_images, seconds)` after every optimizer step.
    """
    step = start_step
    model.train()
    t0 = time.perf_counter()
    for pixels, labels in loader:
        if step >= total_steps:
            break
        pixels, labels = pixels.to(device, non_blocking=True), labels.to(device)
        step_lr = lr_at(step, total_steps, warmup_steps, lr, warmup_lr, min_lr)
        for group in optimizer.param_groups:
            group["lr"] = step_lr * group.get("lr_scale", 1.0)
        with torch.autocast(
            device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
        ):
            logits = model(pixels)
            loss = criterion(logits.float(), labels)
        if not math.isfinite(loss.item()):
            raise NonFiniteLoss(
                f"loss is {loss.item()} at step {step} (epoch {epoch}); "
                "stopping. Lower the lr or lengthen the warmup."
            )
        loss.backward()
        if clip_grad:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        top1 = (logits.argmax(1) == labels).float().mean().item()
        on_step(
            step,
            {"loss": loss.item(), "top1": top1},
            step_lr,
            len(pixels),
            time.perf_counter() - t0,
        )
        t0 = time.perf_counter()
    return step
