"""The similarity-term ablation on Fashion-MNIST: plain SimMIM against SimMIM plus the cosine,
perceptual and contrastive terms, the same schedule, features and evaluation for every arm.

    nice python -m benchmarks.fmnist_ablation --epochs 16 --runs runs/ablation \
        --out benchmarks/results/fmnist_ablation

Each arm is `simmim pretrain --preset vit-tiny-fmnist --epochs E --warmup-epochs 1
--sim-loss ARM --sim-lambda 1 --eval-every 1` (resumed if it was interrupted, skipped if done;
`--jobs N` trains N at a time). Once every arm is trained, `simmim evaluate` scores each on the
full splits (kNN k=20 over the 60k training images, the 10k test images scored; linear probe)
for three feature options, the raw-pixel baseline beside them under the same projection.
Writes table.md, results.json and knn_by_epoch.png (online kNN after every epoch, from each
run's metrics.jsonl). The arms already in OUT/results.json that `--arms` does not name are kept
as they are, so arms trained in different sessions (or on different machines: each records its
CPU) end in one table and one plot. Per 16 epochs alone on the two cores of an Intel Xeon with
AVX-512 and AMX: 32 min (plain) and 64 min (perceptual); `python -m benchmarks.train_step`
times each arm's steps, one at a time and side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .run import machine_info

ARMS = {
    "none": "plain SimMIM",
    "cosine": "SimMIM + cosine",
    "perceptual": "SimMIM + perceptual",
    "contrastive": "SimMIM + contrastive",
}
# the features every arm is compared on: (label, evaluate options)
FEATURES = {
    "grid4": ("grid4 (2048-d)", ["--pooling", "grid4"]),
    "grid4_whiten256": (
        "grid4, PCA-whitened to 256-d",
        ["--pooling", "grid4", "--project", "pca-whiten:256"],
    ),
    "mean": ("mean (128-d)", ["--pooling", "mean"]),
}


def simmim(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "simmim_cli", *args], check=True)


def metrics_rows(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def finished(run: Path) -> bool:
    return any(r.get("done") for r in metrics_rows(run))


def pretrain_arm(arm: str, run: Path, epochs: float, threads: int | None = None) -> None:
    """Train (or resume) one arm; with `threads`, on that many intra-op threads, its output
    appended to RUN/pretrain.log."""
    resume = ["--resume"] if (run / "checkpoint.pt").exists() else []
    cmd = [sys.executable, "-m", "simmim_cli", "pretrain", "--preset", "vit-tiny-fmnist"]
    cmd += ["--data", "fashion-mnist", "--out", str(run), "--epochs", str(epochs)]
    cmd += ["--warmup-epochs", "1", "--sim-loss", arm, "--sim-lambda", "1", "--eval-every", "1"]
    cmd += ["--workers", "1", "--no-progress", *resume]
    if threads is None:
        subprocess.run(cmd, check=True)
        return
    run.mkdir(parents=True, exist_ok=True)
    with open(run / "pretrain.log", "a") as log:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        subprocess.run(cmd, check=True, env=env, stdout=log, stderr=subprocess.STDOUT)


def pretrain_arms(arms: list[str], runs: Path, epochs: float, jobs: int) -> None:
    """Train the unfinished arms, `jobs` at a time, each on its share of the CPUs (an arm left
    alone keeps its share: run again, it resumes on every CPU)."""
    pending = [arm for arm in arms if not finished(runs / arm)]
    jobs = min(jobs, len(pending))
    if jobs <= 1:
        for arm in pending:
            pretrain_arm(arm, runs / arm, epochs)
        return
    threads = max(1, len(os.sched_getaffinity(0)) // jobs)
    print(
        f"training {', '.join(pending)}, {jobs} at a time on {threads} thread(s) each; "
        f"their output: {runs}/ARM/pretrain.log",
        flush=True,
    )
    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(lambda arm: pretrain_arm(arm, runs / arm, epochs, threads), pending))


def evaluated(out: Path, *args: str) -> dict:
    if not out.exists():
        simmim("evaluate", "--data", "fashion-mnist", "--no-progress", "--out", str(out), *args)
    return json.loads(out.read_text())


def kept_arms(path: Path, epochs: float, arms: list[str]) -> dict:
    """The arms of an earlier results.json at `path` that `arms` does not name (none if there
    is no such file). Raises SystemExit if that file compared another number of epochs."""
    if not path.exists():
        return {}
    previous = json.loads(path.read_text())
    if previous["epochs"] != epochs:
        raise SystemExit(
            f"{path} holds {previous['epochs']:g}-epoch arms, not {epochs:g}: "
            "give --epochs the same value or another --out"
        )
    return {arm: entry for arm, entry in previous["arms"].items() if arm not in arms}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for arm, entry in results["arms"].items():
        evals = entry["online"]
        epochs = [r["epoch"] for r in evals]
        axes[0].plot(epochs, [100 * r["knn_top1"] for r in evals], "o-", label=ARMS[arm])
        axes[1].plot(epochs, [100 * r["knn_top1_whitened"] for r in evals], "o-", label=ARMS[arm])
    axes[0].set_title("grid4 features (2048-d)")
    axes[1].set_title("grid4, PCA-whitened to 256-d (fitted on the bank)")
    fig.suptitle(
        "online kNN while pretraining: a 10k bank and 2k queries, both from the training split"
    )
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.set_ylabel("online kNN top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.fmnist_ablation",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--epochs", type=float, default=16, help="epochs per arm")
    p.add_argument(
        "--arms",
        nargs="+",
        default=list(ARMS),
        choices=list(ARMS),
        help="similarity terms to train and evaluate (none: plain SimMIM); the other arms of "
        "OUT/results.json are kept",
    )
    p.add_argument(
        "--runs",
        type=Path,
        default=Path("runs/ablation"),
        help="where the runs are written (resumed if present)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("benchmarks/results/fmnist_ablation"),
        help="where table.md, results.json and knn_by_epoch.png go",
    )
    p.add_argument(
        "--no-train",
        action="store_true",
        help="report the runs as they are (partial curves; no final evaluation of an "
        "unfinished arm)",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="unfinished arms trained at once, each on its share of the CPUs as torch threads "
        "and with its output in RUNS/ARM/pretrain.log (benchmarks.train_step measures whether "
        "that beats one arm at a time on every CPU; an arm left alone keeps its share until "
        "the benchmark is run again); all are trained before any is evaluated",
    )
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    evals = args.runs / "eval"
    evals.mkdir(parents=True, exist_ok=True)
    kept = kept_arms(args.out / "results.json", args.epochs, args.arms)
    results: dict = {"epochs": args.epochs, "arms": {}, "pixels": {}}
    results["pixels"]["raw"] = evaluated(evals / "pixels.json", "--pixels")
    results["pixels"]["whiten256"] = evaluated(
        evals / "pixels_whiten256.json", "--pixels", "--project", "pca-whiten:256"
    )
    if not args.no_train:
        pretrain_arms(args.arms, args.runs, args.epochs, args.jobs)
    fresh = {}
    for arm in args.arms:
        run = args.runs / arm
        done = [r for r in metrics_rows(run) if r.get("done")]
        entry = {
            "online": [r for r in metrics_rows(run) if "knn_top1" in r],
            "seconds": done[-1]["seconds"] if done else None,
            "cpu": machine_info("cpu")["cpu_model"],  # train s compare on one CPU only
        }
        if done:
            entry["test"] = {
                name: evaluated(evals / f"{arm}_{name}.json", "--checkpoint", str(run), *opts)
                for name, (_, opts) in FEATURES.items()
            }
        fresh[arm] = entry
    merged = {**kept, **fresh}
    results["arms"] = {arm: merged[arm] for arm in ARMS if arm in merged}
    plot(results, args.out / "knn_by_epoch.png")
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "table.md").write_text(table(results) + "\n")
    print(table(results))
    return 0


def table(results: dict) -> str:
    head = (
        "| features | "
        + " | ".join(f"{label}: kNN / probe" for label, _ in FEATURES.values())
        + " | train s | CPU |"
    )
    lines = [head, "|---|" + "---|" * (len(FEATURES) + 2)]
    px = results["pixels"]

    def cell(e: dict | None) -> str:
        if not e:
            return "-"
        probe = e.get("linear_probe_top1")
        return f"{e['knn_top1']:.2%} / {probe:.2%}" if probe is not None else f"{e['knn_top1']:.2%}"

    lines.append(
        f"| raw pixels (1024-d) | {cell(px['raw'])} | {cell(px['whiten256'])} | - | - | - |"
    )
    for arm, entry in results["arms"].items():
        test = entry.get("test", {})
        label = f"{ARMS[arm]}, {results['epochs']:g} ep" + ("" if test else " (unfinished)")
        seconds = f"{entry['seconds']:.0f}" if entry["seconds"] else "-"
        lines.append(
            f"| {label} | "
            + " | ".join(cell(test.get(k)) for k in FEATURES)
            + f" | {seconds} | {entry.get('cpu', 'not recorded')} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
