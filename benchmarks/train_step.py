"""Pretraining speed of each similarity arm on this machine's CPUs, in two layouts of the same
cores, so that a long ablation can be planned (and its arms run side by side when that pays).

One step is what `simmim pretrain` does per batch: forward, backward and AdamW on the
vit-tiny-fmnist preset at its batch size (256), with the preset's block masks and a second view
as the similarity terms' target. Pixels are random (the speed does not depend on them) and the
data loader is left out: it costs little beside these steps. Layouts:
  one process      one process with every CPU as torch's intra-op threads (how `simmim
                   pretrain` runs alone);
  side by side     one process per CPU, one thread each, all at once (as many arms trained
                   together): the sum of their img/s.
Each is measured `rounds` times, alternating with the other, and reported by its median.

usage: python -m benchmarks.train_step --out benchmarks/results/train_step [--arms none cosine
           perceptual contrastive] [--seconds 15] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from .run import machine_info
from .servers import ROOT

ARMS = ("none", "cosine", "perceptual", "contrastive")
PRESET = "vit-tiny-fmnist"
FMNIST_TRAIN = 60_000


def step_speed(arm: str, threads: int, seconds: float, seed: int = 0) -> float:
    """img/s of pretraining steps of `arm` on `threads` intra-op threads: 2 steps of warm-up,
    then steps until `seconds` have passed (at least 2)."""
    import dataclasses

    import numpy as np
    import torch

    from simmim_core.masking import MaskGenerator
    from simmim_core.nn.model import SimMIM
    from training.presets import PRESETS

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    preset = PRESETS[PRESET]
    cfg = dataclasses.replace(preset.model, sim_loss=arm)
    model = SimMIM(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=preset.train.base_lr)
    masks = MaskGenerator(
        cfg.image_size, cfg.mask_patch_size, model.patch_size, cfg.mask_ratio, cfg.mask_kind
    )
    rng = np.random.default_rng(seed)
    batch = preset.train.batch_size
    shape = (batch, cfg.in_chans, cfg.image_size, cfg.image_size)
    pixels, target = torch.randn(shape), torch.randn(shape)

    def step() -> None:
        mask = torch.from_numpy(masks(rng, batch))
        loss, _, _ = model(pixels, mask, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        model.update_ema()

    for _ in range(2):
        step()
    steps, start = 0, time.perf_counter()
    while steps < 2 or time.perf_counter() - start < seconds:
        step()
        steps += 1
    return steps * batch / (time.perf_counter() - start)


def worker(arm: str, threads: int, seconds: float) -> subprocess.Popen:
    """A process measuring step_speed; its stdout is the img/s."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    code = (
        "from benchmarks.train_step import step_speed; "
        f"print(step_speed({arm!r}, {threads}, {seconds}))"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True
    )


def layout_speed(arm: str, processes: int, threads: int, seconds: float) -> float:
    """Summed img/s of `processes` processes of `threads` threads each, run at once."""
    procs = [worker(arm, threads, seconds) for _ in range(processes)]
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError(f"a step_speed process of arm {arm!r} failed")
    return sum(float(out.strip().splitlines()[-1]) for out in outs)


def measure(arms: list[str], seconds: float, rounds: int) -> dict:
    cpus = len(os.sched_getaffinity(0))
    layouts = {"one_process": (1, cpus), "side_by_side": (cpus, 1)}
    runs: dict = {arm: {name: [] for name in layouts} for arm in arms}
    for _ in range(rounds):
        for arm in arms:
            for name, (processes, threads) in layouts.items():
                runs[arm][name].append(layout_speed(arm, processes, threads, seconds))
                print(arm, name, f"{runs[arm][name][-1]:.1f} img/s", flush=True)
    return {
        "cpus": cpus,
        "cpu_model": machine_info("cpu")["cpu_model"],
        "layouts": {k: {"processes": p, "threads": t} for k, (p, t) in layouts.items()},
        "seconds": seconds,
        "rounds": rounds,
        "img_s": runs,
        "median_img_s": {
            arm: {name: statistics.median(v) for name, v in r.items()} for arm, r in runs.items()
        },
    }


def markdown(r: dict) -> str:
    n = r["cpus"]
    lines = [
        f"On {r.get('cpu_model', 'a CPU not recorded')}, {n} cores:",
        "",
        f"| arm | one process, {n} threads: img/s | {n} processes of 1 thread at once: img/s "
        "(sum) | side by side / one process | hours for 16 epochs of 60k images, one process |",
        "|---|---|---|---|---|",
    ]
    for arm, m in r["median_img_s"].items():
        one, side = m["one_process"], m["side_by_side"]
        hours = 16 * FMNIST_TRAIN / one / 3600
        lines.append(f"| {arm} | {one:.1f} | {side:.1f} | {side / one:.2f} | {hours:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.train_step",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", type=Path, required=True, help="folder for results.json and table.md")
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS), help="arms to time")
    p.add_argument("--seconds", type=float, default=15.0, help="timed seconds per measurement")
    p.add_argument("--rounds", type=int, default=2, help="measurements per arm and layout")
    args = p.parse_args(argv)
    result = measure(args.arms, args.seconds, args.rounds)
    result["command"] = "python -m benchmarks.train_step " + " ".join(argv or sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "table.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
