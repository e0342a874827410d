"""The `simmim import` command line."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from .run import IMPORTERS, import_run
from .source import ImportOptions, SourceError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="simmim import",
        description="Turn SimMIM weights you already have into a run folder (checkpoint.pt + "
        "config.json) that simmim export, simmim evaluate --checkpoint and simmim finetune "
        "read like a pretrained run. The architecture and the preprocessing (image size, RGB, "
        "mean/std, interpolation) come from the source; nothing is downloaded.",
    )
    p.add_argument(
        "source",
        type=Path,
        help="an official microsoft/SimMIM .pth, a Hugging Face save_pretrained folder of "
        "ViTForMaskedImageModeling or SwinForMaskedImageModeling, or a timm checkpoint "
        "(a state dict file, or a folder with config.json)",
    )
    p.add_argument(
        "--out", type=Path, required=True, help="run folder to create (required; must not exist)"
    )
    p.add_argument(
        "--format",
        choices=sorted(IMPORTERS),
        help="what SOURCE is (default: detected; official: encoder.*/decoder.* keys, hf: a "
        "folder whose config.json has model_type, timm: architecture or patch_embed.* keys)",
    )
    p.add_argument(
        "--image-size",
        type=int,
        help="input size in pixels (default: the source's), for sources that do not say (an "
        "official Swin checkpoint "
        "without attention masks or config); timm: overrides its pretrained_cfg (position "
        "embeddings are resized by timm); other sources: must agree with them",
    )
    p.add_argument(
        "--arch",
        help="timm format: the timm architecture (e.g. vit_base_patch16_224; default: the one "
        "the file or its config.json names)",
    )
    p.add_argument(
        "--domain",
        help="one line on what images the model is for, recorded in the run and written to "
        "model.json by simmim export (default: from the source: its size, colour and origin)",
    )
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    options = ImportOptions(image_size=args.image_size, arch=args.arch)
    command = "simmim import " + shlex.join(sys.argv[2:] if argv is None else argv)
    try:
        out, imported = import_run(
            args.source, args.out, args.format, options, args.domain, command
        )
    except SourceError as e:
        print(f"simmim import: {e}", file=sys.stderr)
        return 1
    model, spec = imported.model, imported.preprocessing
    params = sum(p.numel() for p in model.encoder.parameters())
    print(
        f"wrote {out}: {imported.source['architecture']}, {params:,} encoder parameters, "
        f"{spec.color_mode} {model.cfg.image_size} px (resize {spec.resize_size}, "
        f"{spec.interpolation}, mean {list(spec.mean)}, std {list(spec.std)})"
    )
    if imported.fresh:
        print(
            f"not in the source, initialised fresh: {', '.join(imported.fresh)} "
            "(embeddings are the source's; reconstructions mean nothing until pretrained)"
        )
    print(f"next: simmim export {out} --out models/{out.name} --int8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
