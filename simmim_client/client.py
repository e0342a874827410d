"""`Client` (blocking) and `AsyncClient` (asyncio) for the simmim service (DESIGN §4, §5).

Both split long image lists into requests of `batch_size` images, send at most `max_concurrency`
of them at once, and retry with exponential backoff (with jitter) on 429 and 503, waiting the
server's Retry-After when it gives one, and on connection errors. All of that is written once,
as flows in `simmim_client.protocol`; the two classes only carry the flows' steps out: with
httpx.Client, time.sleep and threads, or with httpx.AsyncClient, asyncio.sleep and tasks.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import httpx
import numpy as np

from .protocol import (
    Call,
    ClientCore,
    EmbedResult,
    Flow,
    Health,
    Reconstruction,
    T,
    Together,
    progress_bar,
)


class Client(ClientCore):
    """Blocking client. Thread-safe; use it as a context manager or call close().

    base_url: default $SIMMIM_URL or http://127.0.0.1:8000; api_key: default $SIMMIM_API_KEY;
    timeout: seconds per HTTP request; batch_size: images per request (keep it at most the
    server's max_images); max_concurrency: requests in flight at once; max_retries, backoff_s,
    max_backoff_s: the retry schedule (backoff_s * 2**attempt, jittered, capped).
    """

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float = 60.0,
        batch_size: int = 32,
        max_concurrency: int = 4,
        max_retries: int = 5,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ):
        super().__init__(
            base_url, api_key, batch_size, max_concurrency, max_retries, backoff_s, max_backoff_s
        )
        self._http = httpx.Client(
            base_url=self.base_url, headers=self.headers, timeout=timeout, transport=transport
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- the transport: carry out a flow's steps --------------------------------------------
    def _run(self, flow: Flow[T]) -> T:
        outcome = None
        while True:
            try:
                step = flow.send(outcome)
            except StopIteration as done:
                return done.value
            if isinstance(step, Call):
                outcome = self._send(step)
            elif isinstance(step, Together):
                outcome = self._together(step)
            else:
                time.sleep(step.seconds)
                outcome = None

    def _send(self, call: Call) -> httpx.Response | httpx.TransportError:
        try:
            return self._http.request(
                call.method, call.path, files=call.files, data=call.data, headers=call.headers
            )
        except httpx.TransportError as e:
            return e

    def _together(self, step: Together) -> list:
        bar = progress_bar(sum(step.sizes), step.progress)

        def run(flow: Flow, size: int):
            result = self._run(flow)
            bar.update(size)
            return result

        pool = ThreadPoolExecutor(min(self.max_concurrency, len(step.flows)))
        try:
            return list(pool.map(run, step.flows, step.sizes))
        finally:
            pool.shutdown(cancel_futures=True)  # after an error: send no more batches
            bar.close()

    # --- the API ----------------------------------------------------------------------------
    def embed(
        self,
        images: Iterable,
        *,
        normalize: bool = True,
        batch_size: int | None = None,
        progress: bool = False,
        on_error: Literal["raise", "skip"] = "raise",
    ) -> np.ndarray | EmbedResult:
        """Images -> float32 [N, D] embeddings, in order (L2-normalised unless normalize=False).

        on_error="raise": the first image that cannot be read or embedded raises (an APIError
        whose .index names it in your list, or the error reading it). on_error="skip": such
        images are left out and an EmbedResult returned: .vectors [M, D], .indexes [M] (which
        of your images each row is), .errors {index: exception}. A request refused for one
        image is sent again without it (a batch with k bad images costs k more requests);
        errors that are no image's fault (key, limits, server) still raise."""
        return self._run(self._embed(images, normalize, batch_size, progress, on_error))

    def similarity(self, a: Sequence, b: Sequence | None = None) -> np.ndarray:
        """float32 [len(a), len(b)] cosine similarities (b omitted: a against itself). One
        /similarity request when a and b fit in batch_size images, else embed() and compare."""
        return self._run(self._similarity(a, b))

    def reconstruct(
        self,
        image,
        *,
        mask_ratio: float | None = None,
        seed: int | None = None,
        paste_visible: bool = True,
    ) -> Reconstruction:
        """SimMIM's masked reconstruction of one image (mask_ratio default: the model's). The
        visible patches are the original's, as in training's grid; paste_visible=False returns
        the raw decoder output everywhere."""
        return self._run(self._reconstruct(image, mask_ratio, seed, paste_visible))

    def reconstruct_picture(
        self,
        image,
        *,
        mask_ratio: float | None = None,
        seed: int | None = None,
        paste_visible: bool = True,
    ) -> bytes:
        """One PNG: original | masked input | reconstruction, side by side."""
        return self._run(self._reconstruct_picture(image, mask_ratio, seed, paste_visible))

    def info(self) -> dict:
        """The model card, the server's settings and runtime."""
        return self._run(self._info())

    def health(self) -> Health:
        """Live and ready, asked once each (no retries)."""
        return self._run(self._health())


class AsyncClient(ClientCore):
    """asyncio client with the same methods as Client (awaitable); see Client for the options."""

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float = 60.0,
        batch_size: int = 32,
        max_concurrency: int = 4,
        max_retries: int = 5,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        super().__init__(
            base_url, api_key, batch_size, max_concurrency, max_retries, backoff_s, max_backoff_s
        )
        self._http = httpx.AsyncClient(
            base_url=self.base_url, headers=self.headers, timeout=timeout, transport=transport
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    # --- the transport: carry out a flow's steps --------------------------------------------
    async def _run(self, flow: Flow[T]) -> T:
        outcome = None
        while True:
            try:
                step = flow.send(outcome)
            except StopIteration as done:
                return done.value
            if isinstance(step, Call):
                outcome = await self._send(step)
            elif isinstance(step, Together):
                outcome = await self._together(step)
            else:
                await asyncio.sleep(step.seconds)
                outcome = None

    async def _send(self, call: Call) -> httpx.Response | httpx.TransportError:
        try:
            return await self._http.request(
                call.method, call.path, files=call.files, data=call.data, headers=call.headers
            )
        except httpx.TransportError as e:
            return e

    async def _together(self, step: Together) -> list:
        bar = progress_bar(sum(step.sizes), step.progress)
        slots = asyncio.Semaphore(self.max_concurrency)

        async def run(flow: Flow, size: int):
            async with slots:
                result = await self._run(flow)
            bar.update(size)
            return result

        tasks = [asyncio.ensure_future(run(f, n)) for f, n in zip(step.flows, step.sizes)]
        try:
            return await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:  # after an error: send no more batches
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        finally:
            bar.close()

    # --- the API ----------------------------------------------------------------------------
    async def embed(
        self,
        images: Iterable,
        *,
        normalize: bool = True,
        batch_size: int | None = None,
        progress: bool = False,
        on_error: Literal["raise", "skip"] = "raise",
    ) -> np.ndarray | EmbedResult:
        return await self._run(self._embed(images, normalize, batch_size, progress, on_error))

    async def similarity(self, a: Sequence, b: Sequence | None = None) -> np.ndarray:
        return await self._run(self._similarity(a, b))

    async def reconstruct(
        self,
        image,
        *,
        mask_ratio: float | None = None,
        seed: int | None = None,
        paste_visible: bool = True,
    ) -> Reconstruction:
        return await self._run(self._reconstruct(image, mask_ratio, seed, paste_visible))

    async def reconstruct_picture(
        self,
        image,
        *,
        mask_ratio: float | None = None,
        seed: int | None = None,
        paste_visible: bool = True,
    ) -> bytes:
        return await self._run(self._reconstruct_picture(image, mask_ratio, seed, paste_visible))

    async def info(self) -> dict:
        return await self._run(self._info())

    async def health(self) -> Health:
        return await self._run(self._health())
