"""The loss curve of a run (PNG, matplotlib); reconstruction grids are simmim_core.visualize."""

from __future__ import annotations

import json
from pathlib import Path


def loss_curve(metrics_path: Path, out_path: Path) -> None:
    """Loss terms against the step from metrics.jsonl; beside them, when the run evaluates
    online, kNN top-1 against the epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line]
    losses = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "knn_top1" in r]
    if not losses and not evals:
        return
    fig, axes = plt.subplots(1, 2 if evals else 1, figsize=(12 if evals else 7, 4), squeeze=False)
    ax = axes[0, 0]
    for key in ("loss", "rec", "sim"):
        if any(r.get(key) for r in losses):
            ax.plot([r["step"] for r in losses], [r[key] for r in losses], label=key)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    if evals:
        ax = axes[0, 1]
        epochs = [r["epoch"] for r in evals]
        if any("val_top1" in r for r in evals):
            ax.plot(
                epochs,
                [100 * r.get("val_top1", float("nan")) for r in evals],
                "^-",
                label="test top-1 (classifier)",
            )
        ax.plot(epochs, [100 * r["knn_top1"] for r in evals], "o-", label="online kNN")
        ax.plot(
            epochs,
            [100 * r["knn_top1_whitened"] for r in evals],
            "s--",
            label=f"online kNN, PCA-whitened to {evals[-1]['whitened_dim']}-d",
        )
        ax.set_xlabel("epoch")
        ax.set_ylabel("top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
