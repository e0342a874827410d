"""The batch-size cap, measured at start-up.

On a GPU, larger batches are faster per image; on a CPU they may be slower: two calls of 32
ViT-S/16 images at once run at 0.6x the img/s of two calls of one image (the activations no
longer fit the caches; `benchmarks/`). So the engine times the model at batch 1, 2, 4, ... up to
max_batch_size, `workers` calls at once as when serving, and caps batches at the largest size
whose img/s is within TOLERANCE of the fastest. The tolerance is tight because a batch size
timed alone does worse under load, when decoding shares the cores and caches (ViT-S/16: 16
timed at 0.92x the fastest, served 64 concurrent photographs at 0.74x of batch 1).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Executor

import numpy as np

TOLERANCE = 0.95


def batch_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, ... below max_batch_size, then max_batch_size itself."""
    return sorted({min(2**k, max_batch_size) for k in range(max_batch_size.bit_length() + 1)})


def batch_rates(
    run: Callable[[np.ndarray], object],
    image_shape: tuple[int, ...],
    max_batch_size: int,
    workers: int,
    pool: Executor,
    min_seconds: float = 0.1,
    repeats: int = 3,
) -> dict[int, float]:
    """img/s of run(float32 [n, *image_shape]) at each of batch_sizes(), `workers` calls at a
    time on `pool`: the best of `repeats` timings of at least min_seconds and one round each
    (anything else on the cores only slows a timing down: a single timing put batch 2 at 0.83x
    batch 1 while another server process was timing too, and capped batches at 1). Stops at the
    first size slower than TOLERANCE x the fastest so far (larger ones only get slower)."""
    rates: dict[int, float] = {}
    for n in batch_sizes(max_batch_size):
        pixels = np.zeros((n, *image_shape), np.float32)
        for _ in range(repeats):
            calls, start = 0, time.perf_counter()
            while calls == 0 or time.perf_counter() - start < min_seconds:
                for future in [pool.submit(run, pixels) for _ in range(workers)]:
                    future.result()
                calls += workers
            rates[n] = max(rates.get(n, 0.0), calls * n / (time.perf_counter() - start))
        if rates[n] < TOLERANCE * max(rates.values()):
            break
    return rates


def batch_cap(rates: dict[int, float]) -> int:
    """The largest batch size whose img/s is within TOLERANCE of the fastest."""
    best = max(rates.values())
    return max(n for n, rate in rates.items() if rate >= TOLERANCE * best)
