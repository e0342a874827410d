"""The batch-size cap measured at start-up: which sizes are timed, when timing stops, and which
size is chosen."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from service_fixtures import ServerProcess

from service.calibrate import batch_cap, batch_rates, batch_sizes


def test_batch_sizes_are_powers_of_two_then_the_maximum():
    assert batch_sizes(1) == [1]
    assert batch_sizes(32) == [1, 2, 4, 8, 16, 32]
    assert batch_sizes(24) == [1, 2, 4, 8, 16, 24]


def test_the_cap_is_the_largest_size_within_five_percent_of_the_fastest():
    assert batch_cap({1: 100, 2: 180, 4: 200, 8: 192, 16: 120}) == 8
    assert batch_cap({1: 100, 2: 180, 4: 200, 8: 185, 16: 120}) == 4
    assert batch_cap({1: 20, 2: 19.5, 4: 15}) == 2
    assert batch_cap({1: 50, 2: 90, 4: 170, 8: 330, 16: 600, 32: 1000}) == 32


def test_timing_runs_workers_calls_at_once_and_stops_once_larger_batches_get_slower():
    seen: list[int] = []

    def model(pixels: np.ndarray) -> None:
        """20 ms a call up to 4 images (faster per image as batches grow), then 20 ms an
        image (as slow as batch 1)."""
        seen.append(len(pixels))
        time.sleep(0.02 * (1 if len(pixels) <= 4 else len(pixels)))

    with ThreadPoolExecutor(2) as pool:
        rates = batch_rates(model, (1, 4, 4), 32, workers=2, pool=pool, min_seconds=0.05)
    assert list(rates) == [1, 2, 4, 8]  # 8 is slower than 4: 16, 32 not tried
    assert rates[4] > 1.5 * rates[2] > 2.5 * rates[1]
    assert batch_cap(rates) == 4
    assert seen.count(8) >= 6 and seen.count(8) % 2 == 0  # 3 timings of rounds of 2 calls


def test_each_size_gets_the_best_of_its_timings():
    slowed = iter([True, False, True])  # the first and last timings of batch 1 disturbed

    def model(pixels: np.ndarray) -> None:
        time.sleep(0.02 * len(pixels) * (3 if len(pixels) == 1 and next(slowed) else 1))

    with ThreadPoolExecutor(1) as pool:
        rates = batch_rates(model, (1, 4, 4), 2, workers=1, pool=pool, min_seconds=0.0)
    assert 30 < rates[1] <= 50 and 30 < rates[2] <= 50  # 20 ms per image; disturbed: 60


def test_the_server_times_batch_sizes_at_start_up_and_shows_the_cap_in_info(
    tiny_model_dir, tmp_path
):
    with ServerProcess(
        tiny_model_dir, tmp_path, api_key=None, args=("--tune-batch-size", "--max-batch-size", "8")
    ) as server:
        server.wait_ready()
        backend = server.http.get("/info").json()["backend"]
    rates = {int(n): r for n, r in backend["img_s_by_batch_size"].items()}
    assert backend["workers"] == 2 and backend["threads"] == 1
    assert list(rates)[:2] == [1, 2] and set(rates) <= {1, 2, 4, 8} and min(rates.values()) > 0
    assert backend["max_batch_size"] == batch_cap(rates) <= 8
