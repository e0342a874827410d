"""Where training runs: one process or several under torchrun (DDP), and mixed precision."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from .checkpoint import state_digest


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world, device); starts the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return dist.get_rank(), world, device
    return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")


def amp_dtype(mode: str, device: torch.device):
    """auto: bf16 on a CUDA device that supports it, else none; bf16: always; off: never."""
    if mode == "off":
        return None
    if mode == "bf16":
        return torch.bfloat16
    supported = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return torch.bfloat16 if supported else None


def check_replicas_agree(model: torch.nn.Module, rank: int, world: int) -> None:
    """DDP keeps every replica identical; verify it bit for bit at the end of a run."""
    digests = [None] * world
    dist.all_gather_object(digests, state_digest(model.state_dict()))
    if len(set(digests)) != 1:
        raise RuntimeError(f"the {world} replicas ended with different parameters: {digests}")
    if rank == 0:
        print(f"parameters identical on all {world} ranks (sha256 {digests[0]})", flush=True)
