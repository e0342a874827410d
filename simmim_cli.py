"""The `simmim` command: one entry point, a subcommand per job.

Each subcommand lives in its own module and is imported only when chosen, so that
`simmim serve` runs where torch is not installed.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "pretrain": ("training.pretrain", "pretrain a SimMIM encoder (one process or torchrun)"),
    "finetune": ("training.finetune", "fine-tune a pretrained run on labelled images"),
    "evaluate": ("training.evaluate", "kNN and linear-probe top-1 of a checkpoint or model dir"),
    "import": ("training.importers.cli", "official SimMIM, Hugging Face or timm weights -> a run"),
    "export": ("training.export", "export a checkpoint to an ONNX model directory"),
    "serve": ("service.cli", "serve a model directory over HTTP (FastAPI + onnxruntime)"),
    "embed": ("retrieval.embed", "embed image files into a Parquet file of vectors (Ray Data)"),
    "index": ("retrieval.index", "load a Parquet file of vectors into Milvus (HNSW, COSINE)"),
    "search": ("retrieval.search", "find the nearest images of query images in Milvus"),
}


# a missing package -> the extra that installs it
EXTRAS = {
    "torch": "train",
    "torchvision": "train",
    "timm": "train",
    "onnx": "train",
    "onnxscript": "train",
    "matplotlib": "train",
    "tqdm": "train",
    "onnxruntime": "serve",
    "fastapi": "serve",
    "uvicorn": "serve",
    "pydantic_settings": "serve",
    "prometheus_client": "serve",
    "orjson": "serve",
}


def usage() -> str:
    lines = [
        "usage: simmim COMMAND [options]   (simmim COMMAND --help explains each option)",
        "",
        "commands:",
    ]
    lines += [f"  {name:<10}{help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] not in COMMANDS:
        print(f"simmim: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(COMMANDS[argv[0]][0])
    except ModuleNotFoundError as e:
        extra = EXTRAS.get(e.name.partition(".")[0] if e.name else "")
        if extra is None:
            raise
        print(
            f"simmim {argv[0]} needs {e.name}, which is not installed: "
            f"pip install 'simmim-service[{extra}]' (or pip install -e '.[{extra}]' in a "
            "checkout)",
            file=sys.stderr,
        )
        return 2
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
