"""What to expect from SimMIM's photograph models on this machine: img/s of ViT-B/16 @224 and
Swin-B (window 6) @192 through onnxruntime, fp32 and int8, as the service runs them.

The weights are random (the speed of these networks does not depend on them) but take the user's
path: written in the official microsoft/SimMIM layout, then `simmim import`, `simmim export
--int8`. Built models are cached in the work folder.

    python -m benchmarks.photo_models --out /tmp/photo-models   # about 15 min on 2 cores
    python -m benchmarks.photo_models --provider cuda --out /tmp/photo-models-gpu
"""

from __future__ import annotations

import argparse
import json
import os
from datetime import datetime, timezone
from pathlib import Path

from .model_speed import run_engines
from .models import BenchModel
from .run import machine_info

ENGINES = ("ort_fp32", "ort_int8")

MODELS = {  # key: (label, preset with the architecture, options simmim import needs)
    "vit_b16": ("SimMIM ViT-B/16 @224", "vit-base-224", []),
    "swin_b": ("SimMIM Swin-B w6 @192", "swin-base-192", ["--image-size", "192"]),
}


def official_checkpoint(preset: str, path: Path) -> None:
    """Random weights of `preset`'s architecture saved under the official key names."""
    import torch

    from simmim_core.nn.model import SimMIM
    from training.presets import PRESETS

    torch.manual_seed(0)
    state = SimMIM(PRESETS[preset].model).state_dict()
    model = {}
    for key, value in state.items():
        name = key.replace("encoder.vit.", "encoder.").replace("encoder.swin.", "encoder.")
        model[name.replace("decoder.proj.", "decoder.0.")] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model}, path)


def build(key: str, work: Path) -> BenchModel:
    import simmim_cli

    label, preset, options = MODELS[key]
    folder = work / key
    if not (folder / "model" / "model.json").is_file():
        official_checkpoint(preset, folder / "official.pth")
        for args in (
            ["import", str(folder / "official.pth"), "--out", str(folder / "run"), *options],
            ["export", str(folder / "run"), "--out", str(folder / "model"), "--int8"],
        ):
            if simmim_cli.main(args + ["--no-progress"] * (args[0] == "export")) != 0:
                raise SystemExit(f"simmim {' '.join(args)} failed")
    return BenchModel(key, label, folder / "model", None, f"{preset}: random weights (seed 0)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.photo_models",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", type=Path, required=True, help="work folder: models and results")
    p.add_argument("--seconds", type=float, default=10.0, help="timing per engine and batch")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16], help="batch sizes")
    p.add_argument(
        "--provider",
        choices=["cpu", "cuda"],
        default="cpu",
        help="onnxruntime execution provider (cuda: onnxruntime-gpu on a GPU machine)",
    )
    args = p.parse_args(argv)
    models = [build(key, args.out) for key in MODELS]
    results = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(args.provider),
        "load_average_1min": {"start": os.getloadavg()[0]},
        "models": {},
    }
    for model in models:
        engines = run_engines(model, args.batches, args.seconds, args.provider, ENGINES)
        results["models"][model.key] = {**model.describe(), "engines": engines}
    results["load_average_1min"]["end"] = os.getloadavg()[0]
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    return 0


def table(results: dict) -> str:
    """Markdown: img/s and CPU milliseconds per image at each batch size."""
    batches = list(next(iter(next(iter(results["models"].values()))["engines"].values())))
    head = [f"img/s, batch {b}" for b in batches] + [f"CPU ms/img, batch {b}" for b in batches]
    lines = ["| model | parameters | engine | " + " | ".join(head) + " |"]
    lines.append("|---|---:|---|" + "---:|" * len(head))
    for m in results["models"].values():
        for engine, by_batch in m["engines"].items():
            cells = [f"{r['img_s']:.1f}" for r in by_batch.values()]
            cells += [f"{r['cpu_ms_per_image']:.0f}" for r in by_batch.values()]
            lines.append(f"| {m['label']} | {m['parameters']:,} | {engine} | {' | '.join(cells)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
