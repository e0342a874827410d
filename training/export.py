"""`simmim export`: a checkpoint -> a model directory (DESIGN §3), parity-checked.

The directory is assembled in a temporary folder beside --out and renamed into place only
after every check passed, so a failure never leaves a partial model directory.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import shlex
import shutil
import sys
import tempfile
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from simmim_core.masking import block_mask
from simmim_core.model_dir import (
    CARD,
    ENCODER,
    ENCODER_INT8,
    FORMAT_VERSION,
    RECONSTRUCT,
    load_model_dir,
    sha256_file,
)
from simmim_core.nn.model import SimMIM
from simmim_core.preprocess import Preprocessing, preprocess

from .checkpoint import CheckpointError, inference_model
from .options import parse_bool
from .projection import Projection, fit_projection, parse_projection
from .run_folder import HelpFormatter, pretraining_info, run_info

OPSETS = range(18, 24)  # what torch.onnx's dynamo exporter emits and onnxruntime runs
# parity limits: |onnx - torch| <= ATOL * max(1, largest |torch value|), so that a projection
# that scales the embedding up (a PCA of large features) is held to the same relative precision
EMBED_ATOL, RECON_ATOL = 1e-4, 1e-3


class ExportError(RuntimeError):
    """An export that cannot be done or did not pass its checks."""


class EncoderGraph(torch.nn.Module):
    """pixels [N, C, H, W] -> embedding [N, D] (pooled, not normalised), then (x - mean) @
    matrix when a projection [D, d] was fitted: [N, d]."""

    def __init__(self, model: SimMIM, projection: Projection | None = None):
        super().__init__()
        self.model = model
        self.projected = projection is not None
        if projection is not None:
            self.register_buffer("mean", torch.from_numpy(projection.mean))
            self.register_buffer("matrix", torch.from_numpy(projection.matrix))

    def forward(self, pixels):
        z = self.model.embed(pixels)
        return (z - self.mean) @ self.matrix if self.projected else z


class ReconstructGraph(torch.nn.Module):
    """pixels [N, C, H, W], mask float32 [N, h, w] (1 = masked) -> reconstruction [N, C, H, W]."""

    def __init__(self, model: SimMIM):
        super().__init__()
        self.model = model

    def forward(self, pixels, mask):
        return self.model.reconstruct(pixels, mask)


def _onnx_export(module, args: tuple, path: Path, inputs: list[str], output: str, opset: int):
    batch = torch.export.Dim("batch", min=1, max=65536)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=inputs,
            output_names=[output],
            dynamic_shapes=tuple({0: batch} for _ in args),
            opset_version=opset,
            dynamo=True,
            external_data=False,
            verbose=False,
        )


def ort_version() -> str:
    import onnxruntime as ort

    return ort.__version__


def parity_images(data: str | None, n: int, size: int, seed: int = 0) -> list:
    """n real images from `data` (when readable; else a warning) plus n random-noise images."""
    from PIL import Image

    from .data import open_dataset

    rng = np.random.default_rng(seed)
    images = [
        Image.fromarray(rng.integers(0, 256, (size + 5, size + 9, 3), dtype=np.uint8))
        for _ in range(n)
    ]
    if data:
        try:
            source = open_dataset(data, "test" if data.startswith("fashion-mnist") else "train")
        except (FileNotFoundError, ValueError) as e:
            print(
                f"warning: parity data {data} cannot be read ({e}); checking parity on "
                "random images only (give --parity-data to use real ones)",
                file=sys.stderr,
            )
            return images
        images += [
            source.encoded(int(i))
            for i in rng.choice(len(source), min(n, len(source)), replace=False)
        ]
    return images


def check_parity(
    encoder: EncoderGraph, model: SimMIM, folder: Path, pixels: np.ndarray, mask: np.ndarray
) -> dict:
    """onnxruntime vs PyTorch on the same pixels; raise ExportError past the tolerances."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    enc = ort.InferenceSession(str(folder / ENCODER), opts, providers=["CPUExecutionProvider"])
    rec = ort.InferenceSession(str(folder / RECONSTRUCT), opts, providers=["CPUExecutionProvider"])
    with torch.no_grad():
        t_emb = encoder(torch.from_numpy(pixels)).numpy()
        t_rec = model.reconstruct(torch.from_numpy(pixels), torch.from_numpy(mask)).numpy()
    o_emb = enc.run(["embedding"], {"pixels": pixels})[0]
    o_rec = rec.run(["reconstruction"], {"pixels": pixels, "mask": mask})[0]
    embed_limit = EMBED_ATOL * max(1.0, float(np.abs(t_emb).max()))
    recon_limit = RECON_ATOL * max(1.0, float(np.abs(t_rec).max()))
    report = {
        "images": int(len(pixels)),
        "embedding_max_abs_diff": float(np.abs(o_emb - t_emb).max()),
        "reconstruction_max_abs_diff": float(np.abs(o_rec - t_rec).max()),
        "embedding_atol": EMBED_ATOL,
        "reconstruction_atol": RECON_ATOL,
        "embedding_limit": embed_limit,
        "reconstruction_limit": recon_limit,
    }
    if not (
        report["embedding_max_abs_diff"] <= embed_limit
        and report["reconstruction_max_abs_diff"] <= recon_limit
    ):
        raise ExportError(
            f"parity check failed: onnxruntime vs PyTorch max |diff| "
            f"embedding {report['embedding_max_abs_diff']:.3g} (limit {embed_limit:.3g}), "
            f"reconstruction {report['reconstruction_max_abs_diff']:.3g} "
            f"(limit {recon_limit:.3g}) on {len(pixels)} images"
        )
    return report


def quantize_int8(folder: Path, pixels: np.ndarray) -> dict:
    """Dynamic int8 quantisation of encoder.onnx; returns cosine(int8, fp32) figures."""
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = folder / "encoder.prep.onnx"
    quant_pre_process(str(folder / ENCODER), str(prepared), skip_symbolic_shape=True)
    quantize_dynamic(str(prepared), str(folder / ENCODER_INT8), weight_type=QuantType.QInt8)
    prepared.unlink()
    fp32 = ort.InferenceSession(str(folder / ENCODER), providers=["CPUExecutionProvider"])
    int8 = ort.InferenceSession(str(folder / ENCODER_INT8), providers=["CPUExecutionProvider"])
    a = fp32.run(["embedding"], {"pixels": pixels})[0]
    b = int8.run(["embedding"], {"pixels": pixels})[0]
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
    return {
        "images": int(len(pixels)),
        "cosine_to_fp32_mean": float(cos.mean()),
        "cosine_to_fp32_min": float(cos.min()),
    }


def default_domain(ckpt: dict, spec: Preprocessing) -> str:
    """One line on what images a model is for: the checkpoint's own statement (an imported run's),
    else its training data and preprocessing."""
    if ckpt.get("domain"):
        return ckpt["domain"]
    look = f"{spec.crop_size} px {'grayscale' if spec.color_mode == 'L' else 'RGB'} images"
    data = ckpt.get("data") or ""
    name = data.partition(":")[0]
    if name == "fashion-mnist":
        return f"{look} of clothing products, centred on black (Fashion-MNIST); not photographs"
    if name == "synthetic":
        return f"{look} of synthetic shapes (a test model)"
    return f"{look} like those in {Path(data).name or 'its training data'}"


def _imported(ckpt: dict) -> dict:
    """Where an imported run's weights came from (simmim import), for the card's training."""
    return {"imported": ckpt["imported"]} if "imported" in ckpt else {}


def export_model_dir(
    checkpoint,
    out: Path,
    *,
    int8: bool = False,
    opset: int = 18,
    name: str | None = None,
    parity_data: str | None = None,
    eval_data: str | None = None,
    pooling: str | None = None,
    feature_layer: int | None = None,
    feature_norm: bool | None = None,
    project: str | None = None,
    project_data: str | None = None,
    progress: bool = False,
    command: str | None = None,
    domain: str | None = None,
) -> Path:
    """Export `checkpoint` (a run folder or .pt) to the model directory `out`; returns `out`.

    pooling, feature_layer, feature_norm: which features are the embedding (None: the
    checkpoint's). project: 'pca:D' or 'pca-whiten:D', fitted on the training split of
    project_data (default: the run's data) and baked into encoder.onnx. command: the command
    line that asked for this export, recorded in model.json.
    domain: one line on what images the model is for (default: default_domain).
    """
    out, checkpoint = Path(out), Path(checkpoint)
    if out.exists():
        raise ExportError(f"output folder {out} already exists; choose a new --out")
    if opset not in OPSETS:
        raise ExportError(
            f"opset {opset} is not supported; choose one of {OPSETS.start}..{OPSETS.stop - 1}"
        )
    projection_kind = parse_projection(project) if project else None
    model, ckpt = inference_model(
        checkpoint, pooling=pooling, feature_layer=feature_layer, feature_norm=feature_norm
    )
    cfg = model.cfg
    spec = Preprocessing.from_dict(ckpt["preprocessing"])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        projection, fitted_on = None, None
        if projection_kind is not None:
            fitted_on = project_data or training_data(ckpt)
            projection = fit_on_training_split(model, spec, fitted_on, *projection_kind, progress)
        encoder = EncoderGraph(model, projection).eval()
        t0 = time.perf_counter()
        example = torch.randn(2, cfg.in_chans, cfg.image_size, cfg.image_size)
        grid = model.encoder.grid
        example_mask = torch.zeros(2, *grid)
        _onnx_export(encoder, (example,), tmp / ENCODER, ["pixels"], "embedding", opset)
        _onnx_export(
            ReconstructGraph(model),
            (example, example_mask),
            tmp / RECONSTRUCT,
            ["pixels", "mask"],
            "reconstruction",
            opset,
        )
        export_seconds = time.perf_counter() - t0
        pixels = preprocess(
            parity_images(parity_data or training_data(ckpt), 16, cfg.image_size), spec
        )
        mask = block_mask(
            np.random.default_rng(0),
            len(pixels),
            cfg.image_size,
            cfg.mask_patch_size,
            model.patch_size,
            cfg.mask_ratio,
        )
        parity = check_parity(encoder, model, tmp, pixels, mask.astype(np.float32))
        card = {
            "format_version": FORMAT_VERSION,
            "name": name or out.name,
            "domain": domain or default_domain(ckpt, spec),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "encoder": {
                "family": cfg.family,
                "arch": cfg.arch,
                "kwargs": cfg.encoder_kwargs,
                "embed_dim": model.embed_dim,
                "patch_size": model.patch_size,
                "stride": model.encoder.stride,
                "mask_grid": list(grid),
                "parameters": sum(p.numel() for p in model.encoder.parameters()),
            },
            "in_chans": cfg.in_chans,
            "image_size": cfg.image_size,
            "patch_size": model.patch_size,
            "mask_patch_size": cfg.mask_patch_size,
            "mask_ratio": cfg.mask_ratio,
            "mask_dtype": "float32",
            "preprocessing": spec.to_dict(),
            "embedding_dim": projection.dim if projection else model.embedding_dim,
            "pooling": cfg.pooling,
            "features": {
                "feature_layer": cfg.feature_layer,
                "feature_norm": cfg.feature_norm,
                "pooling": cfg.pooling,
                "pooled_dim": model.embedding_dim,
            },
            "projection": None
            if projection is None
            else {**projection.describe(), "fitted_on": fitted_on, "split": "train"},
            # from the run's own config: the inference model's drops the similarity term
            "pretraining": {
                k: ckpt["model_config"][k]
                for k in ("sim_loss", "sim_lambda", "rec_loss", "decoder", "mask_kind")
            },
            "training": pretraining_info(checkpoint, ckpt) | _imported(ckpt),
            "finetuned": finetune_card(checkpoint, ckpt),
            "export": {
                "command": command,
                "opset": opset,
                "torch": torch.__version__,
                "onnxruntime": ort_version(),
                "exporter": "dynamo",
                "seconds": round(export_seconds, 1),
                "parity": parity,
            },
            "evaluation": {},
            "files": {},
        }
        if int8:
            card["export"]["int8"] = quantize_int8(tmp, pixels)
        card["files"] = {
            f: {"sha256": sha256_file(tmp / f), "bytes": (tmp / f).stat().st_size}
            for f in (ENCODER, RECONSTRUCT, ENCODER_INT8)
            if (tmp / f).exists()
        }
        (tmp / CARD).write_text(json.dumps(card, indent=2) + "\n")
        if eval_data:
            card["evaluation"] = evaluate_dir(tmp, eval_data, int8, progress)
            (tmp / CARD).write_text(json.dumps(card, indent=2) + "\n")
        load_model_dir(tmp)  # the service's own checks
        tmp.chmod(0o755)  # mkdtemp made it private
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def finetune_card(checkpoint: Path, ckpt: dict) -> dict | None:
    """What model.json says of a fine-tuning: None for a pretrained run; else the labels it
    learned (data, classes), its recipe, its run (steps, epochs, command, duration) and its
    classifier's test top-1. The served embedding is the pre-logits features; the classifier
    head itself is not exported."""
    info = ckpt.get("finetune")
    if not info:
        return None
    run = run_info(checkpoint, ckpt)
    return {
        "run": {k: v for k, v in run.items() if k not in ("data", "seed", "train_config")},
        "data": info["data"],
        "labels": info["labels"],
        "classes": info["classes"],
        "from_run": info["from"],
        "test_top1": info.get("test_top1"),
        "layer_decay": info.get("layer_decay"),
        "recipe": info["config"],
        "decoder_refit": info.get("decoder_refit"),
        "serves": "pre-logits features",
    }


def training_data(ckpt: dict) -> str | None:
    """The data the checkpoint's weights were last trained on (a fine-tuning's, if any)."""
    return (ckpt.get("finetune") or {}).get("data") or ckpt.get("data")


def fit_on_training_split(
    model: SimMIM, spec: Preprocessing, data: str, kind: str, dim: int, progress: bool
) -> Projection:
    """Embed the training split of `data` with `model` and fit the projection on it."""
    from .data import open_dataset
    from .evaluate import batched_embed

    try:
        source = open_dataset(data, "train")
    except (FileNotFoundError, ValueError) as e:
        raise ExportError(
            f"--project needs the training data to fit on: {e}; give --project-data"
        ) from None

    @torch.no_grad()
    def embed(pixels):
        return model.embed(torch.from_numpy(pixels)).numpy()

    features = batched_embed(source, spec, embed, 512, progress, f"fit {kind}")
    try:
        return fit_projection(features, kind, dim)
    except ValueError as e:
        raise ExportError(f"--project {kind}:{dim}: {e}") from None


def evaluate_dir(folder: Path, data: str, int8: bool, progress: bool) -> dict:
    """kNN and linear-probe top-1 through the exported ONNX files and the shared preprocessing."""
    from .evaluate import evaluate, model_dir_embedder, split_labeled

    bank, queries = split_labeled(data, None)
    result = {
        "data": data,
        "fp32": evaluate(
            model_dir_embedder(folder), bank, queries, 20, 0.07, 30, progress=progress
        ),
    }
    if int8:
        result["int8"] = evaluate(
            model_dir_embedder(folder, int8=True), bank, queries, 20, 0.07, 30, progress=progress
        )
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="simmim export",
        description="Export a pretraining checkpoint to a model directory: encoder.onnx, "
        "reconstruct.onnx, model.json (and encoder.int8.onnx). Parity with PyTorch "
        "is checked on random and real images; a failed check fails the export.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("checkpoint", type=Path, help="a run folder (its checkpoint.pt) or a .pt file")
    p.add_argument(
        "--out", type=Path, required=True, help="model directory to create (must not exist)"
    )
    p.add_argument(
        "--int8",
        action="store_true",
        help="also write encoder.int8.onnx (onnxruntime dynamic quantisation)",
    )
    p.add_argument(
        "--opset", type=int, default=18, help=f"ONNX opset, {OPSETS.start}..{OPSETS.stop - 1}"
    )
    p.add_argument("--name", help="model name in model.json (default: the folder name)")
    p.add_argument(
        "--domain",
        help="one line in model.json (and /info) on what images the model is for (default: "
        "the run's own statement, else derived from its training data and preprocessing, "
        "e.g. '32 px grayscale images of clothing products, ... (Fashion-MNIST)')",
    )
    p.add_argument(
        "--parity-data",
        help="data SPEC for the real-image parity check (default: the checkpoint's training data)",
    )
    p.add_argument(
        "--eval-data",
        help="labeled data SPEC (e.g. fashion-mnist): measure kNN and "
        "linear-probe top-1 through the ONNX files and record them in model.json",
    )
    p.add_argument(
        "--pooling",
        help="embedding pooling of encoder.onnx, overriding the "
        "checkpoint's: mean, cls (ViT) or gridK (K x K average grid, flattened)",
    )
    p.add_argument(
        "--feature-layer",
        type=int,
        help="ViT: embed the tokens after this block (1..depth; 0: the last), "
        "overriding the checkpoint's",
    )
    p.add_argument(
        "--feature-norm",
        type=parse_bool,
        help="ViT: pass the embedded tokens through the final norm (true/false), "
        "overriding the checkpoint's",
    )
    p.add_argument(
        "--project",
        metavar="pca:D|pca-whiten:D",
        help="fit a projection to D dimensions on the training split's embeddings "
        "(PCA, or PCA-whitening: unit variance per axis) and bake it into "
        "encoder.onnx; model.json records it (default: none)",
    )
    p.add_argument(
        "--project-data",
        help="data SPEC whose training split --project is fitted on (default: the "
        "data the checkpoint was trained on)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = export_model_dir(
            args.checkpoint,
            args.out,
            int8=args.int8,
            opset=args.opset,
            name=args.name,
            parity_data=args.parity_data,
            eval_data=args.eval_data,
            pooling=args.pooling,
            feature_layer=args.feature_layer,
            feature_norm=args.feature_norm,
            project=args.project,
            project_data=args.project_data,
            progress=not args.no_progress,
            command="simmim export " + shlex.join(sys.argv[2:] if argv is None else argv),
            domain=args.domain,
        )
    except (ExportError, CheckpointError, ValueError) as e:
        print(f"simmim export: {e}", file=sys.stderr)
        return 1
    card = json.loads((out / CARD).read_text())
    parity = card["export"]["parity"]
    print(
        f"wrote {out}: embedding_dim {card['embedding_dim']}, parity max |diff| embedding "
        f"{parity['embedding_max_abs_diff']:.2g}, reconstruction "
        f"{parity['reconstruction_max_abs_diff']:.2g}"
    )
    if "int8" in card["export"]:
        q = card["export"]["int8"]
        print(
            f"int8 cosine to fp32: mean {q['cosine_to_fp32_mean']:.4f}, "
            f"min {q['cosine_to_fp32_min']:.4f}"
        )
    if card["evaluation"]:
        print(json.dumps(card["evaluation"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
