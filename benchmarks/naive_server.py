"""The alternative a user writes first: one FastAPI endpoint that runs the model in PyTorch eager,
one request at a time (the handler is `async def`, so requests run one after another on the
event loop: no batching, no thread pools). Same request and response JSON as the service's
POST /embed (images in base64), same preprocessing (simmim_core.preprocess), same network.

usage: python -m benchmarks.naive_server --model-dir DIR [--checkpoint CKPT] --port P
           [--device cpu|cuda] [--threads N]

--threads 1 is a control, not what a user writes first: on a shared machine, PyTorch's default
of one OpenMP thread per core stalls at every parallel region while another process holds a core.
"""

from __future__ import annotations

import argparse
import base64
import sys
from pathlib import Path

import numpy as np
import torch
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel

from simmim_core.preprocess import Preprocessing, preprocess_image

from .models import BenchModel, torch_encoder


class EmbedRequest(BaseModel):
    images: list[str]
    normalize: bool = True


def create_naive_app(model: BenchModel, device: str) -> FastAPI:
    net, _ = torch_encoder(model, device)
    spec = Preprocessing.from_dict(model.card["preprocessing"])
    app = FastAPI()

    @app.get("/health/ready")
    async def ready() -> dict:
        return {"status": "ready"}

    @app.post("/embed")
    async def embed(request: EmbedRequest) -> dict:
        pixels = np.stack([preprocess_image(base64.b64decode(s), spec) for s in request.images])
        with torch.inference_mode():
            vectors = net.embed(torch.from_numpy(pixels).to(device))
            if request.normalize:
                vectors = torch.nn.functional.normalize(vectors, dim=1)
        return {
            "model": model.card["name"],
            "dim": vectors.shape[1],
            "embeddings": vectors.cpu().tolist(),
        }

    return app


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.naive_server",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument(
        "--checkpoint",
        type=Path,
        help="the model's weights for PyTorch (default: its architecture with random weights)",
    )
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch.set_num_threads (default 0: PyTorch's own choice)",
    )
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = BenchModel("naive", "naive", args.model_dir, args.checkpoint, "")
    uvicorn.run(
        create_naive_app(model, args.device),
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
        access_log=False,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
