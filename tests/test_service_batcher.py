"""The batcher on its own, with a fake model: batching, ordering, limits, timeouts, failures."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from service.batcher import Batcher
from service.errors import InferenceFailed, QueueFull, RequestTimeout, ShuttingDown, WorkerFailed
from service.metrics import Metrics


class FakeModel:
    """Doubles each input; records every batch and the thread it ran on; can be held by a gate
    and can fail on a chosen input."""

    def __init__(self, fail_on=None, kill_on=None):
        self.batches: list[list] = []
        self.inside = self.most_inside = 0  # calls running now, and at most
        self.lock = threading.Lock()
        self.threads: set[int] = set()
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.fail_on, self.kill_on = fail_on, kill_on

    def __call__(self, inputs: list) -> list:
        with self.lock:
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
        self.entered.set()
        self.gate.wait()
        with self.lock:
            self.inside -= 1
        self.threads.add(threading.get_ident())
        self.batches.append(list(inputs))
        if self.fail_on in inputs:
            raise ValueError("bad input")
        if self.kill_on in inputs:
            raise KeyboardInterrupt  # what no `except Exception` catches: the worker is gone
        return [2 * x for x in inputs]


def run(test, model: FakeModel, pool_threads: int = 1, **options):
    """Run `test(batcher, metrics)` in a fresh event loop with a started batcher; its deaths
    are recorded in batcher.deaths (the on_fatal calls)."""

    async def main():
        metrics = Metrics()
        deaths: list[str] = []
        settings = dict(max_batch_size=4, max_wait_s=0.05, max_queue=16) | options
        settings.setdefault("on_fatal", deaths.append)
        with ThreadPoolExecutor(pool_threads) as pool:
            batcher = Batcher(
                "embed", model, executor=pool, metrics=metrics.task("embed"), **settings
            )
            batcher.deaths = deaths
            batcher.start()
            try:
                return await test(batcher, metrics)
            finally:
                model.gate.set()
                await batcher.close()

    return asyncio.run(main())


async def wait_for_entry(model: FakeModel) -> None:
    """Until the model has been called (its gate may hold it there)."""
    await asyncio.get_running_loop().run_in_executor(None, model.entered.wait, 10)
    assert model.entered.is_set()


def sample(metrics: Metrics, name: str, **labels) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def test_concurrent_submits_share_batches_and_each_gets_its_own_outputs_in_order():
    model = FakeModel()

    async def test(batcher, metrics):
        results = await asyncio.gather(
            batcher.submit([1, 2], 10), batcher.submit([3], 10), batcher.submit([4, 5, 6], 10)
        )
        return [outputs for outputs, _ in results]

    assert run(test, model) == [[2, 4], [6], [8, 10, 12]]
    assert sorted(x for batch in model.batches for x in batch) == [1, 2, 3, 4, 5, 6]
    assert max(len(b) for b in model.batches) == 4  # batched across requests


def test_batches_never_exceed_max_batch_size():
    model = FakeModel()

    async def test(batcher, metrics):
        outputs, _ = await batcher.submit(list(range(10)), 10)
        return outputs

    assert run(test, model, max_batch_size=3) == [2 * x for x in range(10)]
    assert [len(b) for b in model.batches] == [3, 3, 3, 1]


def test_a_lone_item_is_run_without_waiting_for_company():
    model = FakeModel()

    async def test(batcher, metrics):
        return await batcher.submit(["x"], 10)

    outputs, timing = run(test, model, max_wait_s=0.0)
    assert outputs == ["xx"] and timing.queue_s >= 0 and timing.inference_s >= 0


def test_a_batch_waits_for_company_only_while_more_items_are_coming():
    model = FakeModel()
    coming = [1]  # one more request is being decoded

    async def test(batcher, metrics):
        first = asyncio.ensure_future(batcher.submit(["a"], 10))
        for _ in range(20):  # the batcher runs, and keeps waiting
            await asyncio.sleep(0)
        assert model.batches == []
        coming[0] = 0  # the last one arrives: nothing else is
        second = await batcher.submit(["b"], 10)
        return (await first)[0], second[0]

    assert run(test, model, max_wait_s=3600, coming=lambda: coming[0]) == (["aa"], ["bb"])
    assert model.batches == [["a", "b"]]


def test_items_queued_while_the_model_is_busy_form_the_next_batch():
    model = FakeModel()
    model.gate.clear()

    async def test(batcher, metrics):
        first = asyncio.ensure_future(batcher.submit([0], 10))
        await wait_for_entry(model)  # batch [0] is held inside the model
        rest = [asyncio.ensure_future(batcher.submit([i], 10)) for i in range(1, 5)]
        await asyncio.sleep(0)  # let them be admitted
        model.gate.set()
        return [(await f)[0] for f in [first, *rest]]

    assert run(test, model) == [[0], [2], [4], [6], [8]]
    assert model.batches == [[0], [1, 2, 3, 4]]


@pytest.mark.parametrize("workers", [1, 2])
def test_up_to_workers_batches_run_at_once_and_never_more(workers):
    model = FakeModel()
    model.gate.clear()

    async def test(batcher, metrics):
        requests = [asyncio.ensure_future(batcher.submit([i], 10)) for i in range(4)]
        await wait_for_entry(model)
        for _ in range(50):  # give the others every chance to enter
            await asyncio.sleep(0.001)
        running = model.inside
        model.gate.set()
        return running, [(await r)[0] for r in requests]

    running, outputs = run(test, model, pool_threads=4, max_batch_size=1, workers=workers)
    assert running == model.most_inside == workers
    assert outputs == [[0], [2], [4], [6]]


def test_a_full_queue_raises_queue_full_with_retry_after_and_admits_nothing():
    model = FakeModel()
    model.gate.clear()

    async def test(batcher, metrics):
        held = asyncio.ensure_future(batcher.submit([1, 2, 3], 10))
        await wait_for_entry(model)
        with pytest.raises(QueueFull) as info:
            await batcher.submit([4, 5], 10)  # 3 + 2 > 4: none of the two is admitted
        assert int(info.value.headers["Retry-After"]) >= 1
        assert batcher.pending == 3
        fits = asyncio.ensure_future(batcher.submit([4], 10))  # 3 + 1 fits
        await asyncio.sleep(0)
        assert batcher.pending == 4
        model.gate.set()
        return (await held)[0], (await fits)[0]

    assert run(test, model, max_queue=4) == ([2, 4, 6], [8])


def test_timed_out_items_are_dropped_before_batching():
    model = FakeModel()
    model.gate.clear()

    async def test(batcher, metrics):
        held = asyncio.ensure_future(batcher.submit(["held"], 10))
        await wait_for_entry(model)
        with pytest.raises(RequestTimeout):
            await batcher.submit(["late-1", "late-2"], 0.01)
        await asyncio.sleep(0)  # one loop turn: the done callbacks run
        assert batcher.pending == 1  # the timed-out items freed their slots
        model.gate.set()
        await held
        outputs, _ = await batcher.submit(["next"], 10)
        return outputs, sample(metrics, "simmim_items_dropped_total", task="embed")

    outputs, dropped = run(test, model)
    assert outputs == ["nextnext"] and dropped == 2
    assert model.batches == [["held"], ["next"]]


def test_a_cancelled_request_frees_its_slots_and_its_items_are_never_run():
    model = FakeModel()
    model.gate.clear()

    async def test(batcher, metrics):
        held = asyncio.ensure_future(batcher.submit([1], 10))
        await wait_for_entry(model)
        gone = asyncio.ensure_future(batcher.submit([2, 3], 10))
        await asyncio.sleep(0)
        gone.cancel()  # e.g. the client disconnected
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert batcher.pending == 1
        model.gate.set()
        await held
        return (await batcher.submit([4], 10))[0]

    assert run(test, model) == [8]
    assert [2] not in model.batches and all(2 not in b for b in model.batches)


def test_a_failed_batch_fails_only_its_own_requests_and_the_loop_keeps_running():
    model = FakeModel(fail_on="bad")
    model.gate.clear()

    async def test(batcher, metrics):
        held = asyncio.ensure_future(batcher.submit(["ok-before"], 10))
        await wait_for_entry(model)
        doomed = [asyncio.ensure_future(batcher.submit([x], 10)) for x in ("a", "bad", "b")]
        await asyncio.sleep(0)
        model.gate.set()
        assert (await held)[0] == ["ok-beforeok-before"]
        for f in doomed:  # all three shared the failing batch
            with pytest.raises(InferenceFailed):
                await f
        after, _ = await batcher.submit(["ok-after"], 10)
        return after, sample(metrics, "simmim_failed_batches_total", task="embed")

    after, failed = run(test, model)
    assert after == ["ok-afterok-after"] and failed == 1


def test_the_model_runs_off_the_event_loop_thread():
    model = FakeModel()
    loop_threads = set()

    async def test(batcher, metrics):
        loop_threads.add(threading.get_ident())
        return await batcher.submit([1, 2], 10)

    run(test, model)
    assert model.threads and not model.threads & loop_threads


def test_close_runs_what_is_queued_then_refuses_new_items():
    model = FakeModel()
    model.gate.clear()

    async def test(batcher, metrics):
        held = asyncio.ensure_future(batcher.submit([1], 10))
        await wait_for_entry(model)
        queued = asyncio.ensure_future(batcher.submit([2, 3], 10))
        await asyncio.sleep(0)
        closing = asyncio.ensure_future(batcher.close())
        await asyncio.sleep(0)
        with pytest.raises(ShuttingDown):
            await batcher.submit([4], 10)
        model.gate.set()
        await closing
        return (await held)[0], (await queued)[0]

    assert run(test, model) == ([2], [4, 6])


def test_metrics_record_batch_sizes_queue_waits_and_inference_time():
    model = FakeModel()

    async def test(batcher, metrics):
        await batcher.submit([1, 2, 3], 10)
        return metrics

    metrics = run(test, model)
    assert sample(metrics, "simmim_batch_size_count", task="embed") == 1
    assert sample(metrics, "simmim_batch_size_sum", task="embed") == 3
    assert sample(metrics, "simmim_queue_wait_seconds_count", task="embed") == 3
    assert sample(metrics, "simmim_inference_seconds_count", task="embed") == 1
    assert sample(metrics, "simmim_images_total", task="embed") == 3
    assert sample(metrics, "simmim_queue_depth", task="embed") == 0


def test_a_model_call_that_kills_its_worker_fails_every_pending_request_at_once():
    model = FakeModel(kill_on="fatal")
    model.gate.clear()

    async def test(batcher, metrics):
        running = asyncio.ensure_future(batcher.submit(["fatal"], 60))
        await wait_for_entry(model)
        queued = [asyncio.ensure_future(batcher.submit([x], 60)) for x in ("a", "b")]
        await asyncio.sleep(0)
        model.gate.set()
        for request in (running, *queued):  # at once: not after the 60 s timeout
            with pytest.raises(WorkerFailed, match="KeyboardInterrupt"):
                await asyncio.wait_for(request, 10)
        with pytest.raises(WorkerFailed):  # and every later request
            await batcher.submit(["c"], 60)
        return batcher.deaths, batcher.pending

    deaths, pending = run(test, model, max_batch_size=1)
    assert deaths == ["the embed batcher died (a model call raised KeyboardInterrupt)"]
    assert pending == 0


def test_a_batcher_loop_that_dies_fails_every_pending_request_and_says_so_once():
    model = FakeModel()

    def coming() -> int:  # asked by the loop while it forms a batch
        raise RuntimeError("a bug inside the loop")

    async def test(batcher, metrics):
        requests = [asyncio.ensure_future(batcher.submit([x], 60)) for x in (1, 2, 3)]
        for request in requests:
            with pytest.raises(WorkerFailed, match="its loop raised"):
                await asyncio.wait_for(request, 10)
        return batcher.deaths

    deaths = run(test, model, coming=coming, max_batch_size=4)
    assert len(deaths) == 1 and "loop raised" in deaths[0]


def test_the_expected_wait_counts_the_items_and_follows_the_measured_model_time():
    model = FakeModel()

    async def test(batcher, metrics):
        assert batcher.expected_wait_s(10) == pytest.approx(10 * 100 / 2)  # the start-up figure
        await batcher.submit([1, 2, 3, 4], 10)  # a measured batch replaces it
        return batcher.expected_wait_s(10), batcher.expected_wait_s(20)

    ten, twenty = run(test, model, workers=2, pool_threads=2, item_s=100.0)
    assert 0 < ten < 10 * 100 / 2 and twenty == pytest.approx(2 * ten)


class SlowModel(FakeModel):
    """FakeModel that sleeps `item_s` per input, and records the seconds it took per input."""

    def __init__(self, item_s: float):
        super().__init__()
        self.item_s, self.seconds, self.items = item_s, 0.0, 0

    def __call__(self, inputs: list) -> list:
        start = time.perf_counter()
        time.sleep(self.item_s * len(inputs))
        self.seconds += time.perf_counter() - start
        self.items += len(inputs)
        return super().__call__(inputs)


@pytest.mark.parametrize("workers", [1, 2])
def test_the_capacity_estimate_leaves_out_the_time_its_workers_idled(workers):
    """A burst after an idle spell is not read as a slow model. Counting the spell would set the
    rate to the burst's first batch over it, and the admission would then refuse nearly
    everything (no backlog could form to correct it). With two workers, batches that start
    together do not read as an instant one."""
    model = SlowModel(0.01)

    async def test(batcher, metrics):
        await batcher.submit([0], 10)  # one batch, then the workers wait for work
        await asyncio.sleep(1.0)
        await asyncio.gather(*(batcher.submit([i], 10) for i in range(24)))  # 6 full batches
        return batcher.expected_wait_s(100)

    wait = run(test, model, max_batch_size=4, max_queue=32, workers=workers, pool_threads=workers)
    model_s = 100 * model.seconds / model.items / workers  # 100 items on every worker at once
    assert 0.9 * model_s <= wait < 1.5 * model_s
