"""`simmim evaluate`: kNN and linear-probe top-1 of embeddings on a labeled set.

Embeddings come from a checkpoint (PyTorch), a model directory (onnxruntime) or raw pixels, all
through the one preprocessing function (simmim_core.preprocess).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from simmim_core.preprocess import Preprocessing, preprocess

from .checkpoint import CheckpointError, inference_model, load_checkpoint
from .data import open_dataset, split_holdout
from .options import parse_bool
from .projection import fit_projection, parse_projection
from .run_folder import HelpFormatter


def batched_embed(
    source, spec: Preprocessing, fn, batch_size: int, progress: bool, desc: str
) -> np.ndarray:
    """fn(pixels float32 [B, C, H, W]) -> [B, D] over every image of `source`; float32 [N, D]."""
    out = []
    for start in tqdm(
        range(0, len(source), batch_size),
        desc=desc,
        disable=not progress,
        unit="batch",
        dynamic_ncols=True,
    ):
        idx = range(start, min(start + batch_size, len(source)))
        out.append(
            np.asarray(fn(preprocess([source.encoded(i) for i in idx], spec)), dtype=np.float32)
        )
    return np.concatenate(out)


def checkpoint_embedder(path, **features):
    """(preprocessing, fn) for a training checkpoint, run in PyTorch on the CPU; features:
    pooling, feature_layer, feature_norm overriding the checkpoint's."""
    model, ckpt = inference_model(path, **features)

    @torch.no_grad()
    def fn(pixels):
        return model.embed(torch.from_numpy(pixels)).numpy()

    return Preprocessing.from_dict(ckpt["preprocessing"]), fn


def model_dir_embedder(path, int8: bool = False):
    """(preprocessing, fn) for an exported model directory, run by onnxruntime."""
    import onnxruntime as ort

    from simmim_core.model_dir import ENCODER, ENCODER_INT8, load_model_dir

    md = load_model_dir(path)
    session = ort.InferenceSession(
        str(md.file(ENCODER_INT8 if int8 else ENCODER)), providers=["CPUExecutionProvider"]
    )
    return md.preprocessing, lambda pixels: session.run(["embedding"], {"pixels": pixels})[0]


def pixel_embedder(spec: Preprocessing):
    """Raw normalised pixels as the embedding (the baseline)."""
    return spec, lambda pixels: pixels.reshape(len(pixels), -1)


def knn_top1(
    bank: np.ndarray,
    bank_labels: np.ndarray,
    queries: np.ndarray,
    query_labels: np.ndarray,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> float:
    """Weighted kNN top-1: cosine similarity, the k nearest vote with weight exp(sim / T)."""
    k = min(k, len(bank))
    bank_t = F.normalize(torch.from_numpy(bank), dim=1)
    n_classes = int(max(bank_labels.max(), query_labels.max())) + 1
    labels_t = torch.from_numpy(bank_labels).long()
    correct = 0
    for start in range(0, len(queries), chunk):
        q = F.normalize(torch.from_numpy(queries[start : start + chunk]), dim=1)
        sim, idx = (q @ bank_t.T).topk(k, dim=1)  # [B, k]
        votes = torch.zeros(len(q), n_classes).scatter_add_(
            1, labels_t[idx], (sim / temperature).exp()
        )
        correct += (votes.argmax(1).numpy() == query_labels[start : start + chunk]).sum()
    return float(correct) / len(queries)


def linear_probe_top1(
    train: np.ndarray,
    train_labels: np.ndarray,
    test: np.ndarray,
    test_labels: np.ndarray,
    epochs: int = 30,
    seed: int = 0,
) -> float:
    """Softmax regression on standardised frozen embeddings (AdamW, cosine lr, batch 256)."""
    g = torch.Generator().manual_seed(seed)
    mean, std = train.mean(0), train.std(0) + 1e-6
    x = torch.from_numpy((train - mean) / std)
    xt = torch.from_numpy((test - mean) / std)
    y = torch.from_numpy(train_labels).long()
    n_classes = int(max(train_labels.max(), test_labels.max())) + 1
    head = torch.nn.Linear(x.shape[1], n_classes)
    torch.nn.init.zeros_(head.weight)  # start from "no opinion", not a random guess
    torch.nn.init.zeros_(head.bias)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-4)
    steps = epochs * ((len(x) + 255) // 256)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(256):
            loss = F.cross_entropy(head(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        return float((head(xt).argmax(1).numpy() == test_labels).mean())


def split_labeled(spec: str, test_spec: str | None, holdout: float = 0.0):
    """(train, test) image sources: fashion-mnist train/test, or a folder and a test folder; a
    folder alone is split (holdout of it, seeded) when holdout > 0, else ValueError."""
    name = spec.partition(":")[0]
    if name == "fashion-mnist":
        return open_dataset(name, "train"), open_dataset(name, "test")
    if name == "synthetic":  # synthetic:N keeps its N for both splits
        return open_dataset(spec, "train"), open_dataset(spec, "test")
    if test_spec is not None:
        return open_dataset(spec), open_dataset(test_spec)
    if holdout <= 0:
        raise ValueError("a folder needs --test-data (a folder with the same classes)")
    return split_holdout(open_dataset(spec), holdout)


def evaluate(
    embedder,
    bank_src,
    query_src,
    k: int,
    temperature: float,
    probe_epochs: int,
    batch_size: int = 512,
    progress: bool = True,
    project: str | None = None,
) -> dict:
    """Embed both sets and measure kNN and linear-probe top-1; with project ('pca:D' or
    'pca-whiten:D'), a projection fitted on the bank is applied to both sets first."""
    spec, fn = embedder
    t0 = time.perf_counter()
    bank = batched_embed(bank_src, spec, fn, batch_size, progress, "embed train")
    queries = batched_embed(query_src, spec, fn, batch_size, progress, "embed test")
    seconds = time.perf_counter() - t0
    projection = None
    if project:
        projection = fit_projection(bank, *parse_projection(project))
        bank, queries = projection(bank), projection(queries)
    report = {
        "knn_top1": knn_top1(bank, bank_src.labels, queries, query_src.labels, k, temperature),
        "k": k,
        "knn_temperature": temperature,
        "embedding_dim": int(bank.shape[1]),
        "train_images": len(bank),
        "test_images": len(queries),
        "embed_seconds": round(seconds, 1),
    }
    if projection is not None:
        report["projection"] = projection.describe()
    if probe_epochs > 0:
        report["linear_probe_top1"] = linear_probe_top1(
            bank, bank_src.labels, queries, query_src.labels, probe_epochs
        )
        report["probe_epochs"] = probe_epochs
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="simmim evaluate",
        description="kNN (cosine, temperature-weighted votes) and linear-probe top-1 of an "
        "encoder's embeddings; the training split is the kNN bank and the probe's "
        "training set, the test split is scored. A fine-tuned checkpoint also reports its "
        "classifier's top-1.",
        formatter_class=HelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a run folder or checkpoint.pt (PyTorch)")
    src.add_argument("--model-dir", help="an exported model directory (onnxruntime)")
    src.add_argument(
        "--pixels",
        action="store_true",
        help="raw pixels as embeddings (the baseline); see --image-size",
    )
    p.add_argument(
        "--data",
        default="fashion-mnist",
        help="fashion-mnist, synthetic, or a folder with one subfolder per class",
    )
    p.add_argument("--test-data", help="test folder (when --data is a folder)")
    p.add_argument(
        "--pooling", help="with --checkpoint: override the embedding pooling (mean, cls, gridK)"
    )
    p.add_argument(
        "--feature-layer",
        type=int,
        help="with --checkpoint: embed the tokens after this ViT block (0: last)",
    )
    p.add_argument(
        "--feature-norm",
        type=parse_bool,
        help="with --checkpoint: pass them through the final norm (true/false)",
    )
    p.add_argument(
        "--project",
        metavar="pca:D|pca-whiten:D",
        help="project every embedding to D dimensions with PCA or PCA-whitening "
        "fitted on the training split (as simmim export --project bakes in), so that "
        "pixels and encoders compare under the same projection (default: none)",
    )
    p.add_argument("--int8", action="store_true", help="use encoder.int8.onnx of --model-dir")
    p.add_argument("--image-size", type=int, default=32, help="pixel baseline: image size")
    p.add_argument("--k", type=int, default=20, help="neighbours that vote")
    p.add_argument("--temperature", type=float, default=0.07, help="vote weight exp(sim / T)")
    p.add_argument("--probe-epochs", type=int, default=30, help="linear probe epochs (0: skip)")
    p.add_argument("--batch-size", type=int, default=512, help="images per embedding batch")
    p.add_argument("--out", type=Path, help="write the JSON report here (also printed)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = run(args)
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        print(f"simmim evaluate: {e}", file=sys.stderr)
        return 2
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


def run(args) -> dict:
    features = {
        "pooling": args.pooling,
        "feature_layer": args.feature_layer,
        "feature_norm": args.feature_norm,
    }
    if args.checkpoint:
        embedder = checkpoint_embedder(args.checkpoint, **features)
        what = {"checkpoint": args.checkpoint, **features}
    elif args.model_dir:
        embedder = model_dir_embedder(args.model_dir, args.int8)
        what = {"model_dir": args.model_dir, "int8": args.int8}
    else:
        from .presets import FMNIST_MEAN, FMNIST_STD

        embedder = pixel_embedder(
            Preprocessing("L", args.image_size, args.image_size, "bicubic", FMNIST_MEAN, FMNIST_STD)
        )
        what = {"pixels": True, "image_size": args.image_size}
    bank_src, query_src = split_labeled(args.data, args.test_data)
    report = {
        **what,
        "data": args.data,
        **evaluate(
            embedder,
            bank_src,
            query_src,
            args.k,
            args.temperature,
            args.probe_epochs,
            args.batch_size,
            not args.no_progress,
            args.project,
        ),
    }
    if args.checkpoint and "head" in load_checkpoint(args.checkpoint):
        report["finetuned_top1"] = classifier_top1(args.checkpoint, query_src)
    return report


def classifier_top1(checkpoint, source) -> float:
    """Top-1 of a fine-tuned checkpoint's own classifier (its head on its features)."""
    from .finetune import Classifier, top1

    model, ckpt = inference_model(checkpoint)
    classifier = Classifier(model, len(ckpt["finetune"]["classes"]))
    classifier.head.load_state_dict(ckpt["head"])
    return top1(
        classifier, source, Preprocessing.from_dict(ckpt["preprocessing"]), torch.device("cpu")
    )


if __name__ == "__main__":
    sys.exit(main())
