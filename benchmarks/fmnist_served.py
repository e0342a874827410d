"""The default model as a client meets it: Fashion-MNIST embedded through a running
`simmim serve` (/embed, via simmim_client), scored by kNN and a linear probe, beside the
figures its model card claims, and its encoder's speed against another model's in one run.

    python -m benchmarks.fmnist_served --model-dir service/default_model \
        --baseline-model-dir /tmp/old_default/service/default_model \
        --out benchmarks/results/default_model

Every image (60k training, 10k test) is sent as the PNG of its 28 x 28 pixels, as a client would
upload it; the vectors come back L2-normalised (normalize=true). kNN: k=20, cosine, votes
exp(sim / 0.07), the training split as the bank; linear probe: 30 epochs, as `simmim evaluate`.
With --int8, the int8 encoder is served and scored too. Speed: onnxruntime fp32 img/s at batch
16 (the service's session options, one process), the two models alternating over 3 rounds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from simmim_client import Client, encode_png
from training.data import open_dataset
from training.evaluate import knn_top1, linear_probe_top1

from .model_speed import OrtEncoder, measure
from .models import BenchModel
from .servers import simmim_serve


def served_vectors(model_dir: Path, images: np.ndarray, int8: bool, log: Path) -> np.ndarray:
    """float32 [N, D]: every uint8 [28, 28] image through /embed of a fresh server. Its requests
    queue for up to 30 s instead of the default 0.25 s: a measurement of accuracy must not fail
    because other jobs slow the server (admission is measured by benchmarks.reliability)."""
    settings = {"max_queue_wait_s": "30", **({"int8": "true"} if int8 else {})}
    with simmim_serve(model_dir, log, settings) as server, Client(server.url) as client:
        pngs = [encode_png(a) for a in images]
        return client.embed(pngs, batch_size=64, progress=True)


def scores(train: np.ndarray, test: np.ndarray, y_train, y_test) -> dict:
    return {
        "knn_top1": knn_top1(train, y_train, test, y_test, 20, 0.07),
        "linear_probe_top1": linear_probe_top1(train, y_train, test, y_test, 30),
    }


def speed(models: dict[str, Path], rounds: int = 3, seconds: float = 4.0) -> dict:
    """fp32 img/s at batch 16 of each model, alternating, median of rounds and their ratio."""
    engines = {
        name: OrtEncoder(BenchModel(name, name, path, None, ""), False, "cpu")
        for name, path in models.items()
    }
    per_round: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, engine in engines.items():
            per_round[name].append(measure(engine.caller(16), 16, seconds, engine.workers)["img_s"])
    return {
        name: {"img_s_rounds": r, "img_s_median": float(np.median(r))}
        for name, r in per_round.items()
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.fmnist_served",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model-dir", type=Path, required=True, help="model directory to serve")
    p.add_argument("--int8", action="store_true", help="also serve and score encoder.int8.onnx")
    p.add_argument(
        "--baseline-model-dir",
        type=Path,
        help="another model directory whose encoder speed the model is compared with",
    )
    p.add_argument("--out", type=Path, required=True, help="folder for results.json")
    p.add_argument(
        "--limit",
        type=int,
        default=0,
        help="use only the first N training and N test images (a smoke run; 0: all)",
    )
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    train, test = open_dataset("fashion-mnist", "train"), open_dataset("fashion-mnist", "test")
    n = args.limit or None
    x_train, y_train = train.images[:n], train.labels[:n]
    x_test, y_test = test.images[:n], test.labels[:n]
    card = json.loads((args.model_dir / "model.json").read_text())
    started = time.time()
    result = {
        "model": card["name"],
        "embedding_dim": card["embedding_dim"],
        "card_evaluation": card.get("evaluation"),
        "files_bytes": {k: v["bytes"] for k, v in card["files"].items()},
        "served": {},
    }
    for int8 in [False, True] if args.int8 else [False]:
        name = "int8" if int8 else "fp32"
        log = args.out / f"serve_{name}.log"
        a = served_vectors(args.model_dir, x_train, int8, log)
        b = served_vectors(args.model_dir, x_test, int8, log.with_suffix(".test.log"))
        result["served"][name] = scores(a, b, y_train, y_test)
        print(name, result["served"][name], flush=True)
    if args.baseline_model_dir:
        s = speed({"model": args.model_dir, "baseline": args.baseline_model_dir})
        s["ratio"] = s["model"]["img_s_median"] / s["baseline"]["img_s_median"]
        result["speed_fp32_batch16"] = s
    result["seconds"] = round(time.time() - started, 1)
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
