"""`Client` (blocking) and `AsyncClient` (asyncio) for the simmim service (DESIGN §4, §5).

Both split long image lists into requests of `batch_size` images, send at most `max_concurrency`
of them at once, and retry with exponential backoff (with jitter) on 429 and 503, waiting the
server's Retry-After when it gives one, and on connection errors. What the two share (building
requests, reading answers, the retry rule) lives in `_Common`; they differ only in how they wait.
"""

from __future__ import annotations

import asyncio
import base64
import os
import random
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import numpy as np

from .errors import APIError, ConnectionFailedError, error_from_response, retry_after
from .images import to_upload

DEFAULT_URL = "http://127.0.0.1:8000"
RETRY_STATUSES = (429, 503)
RETRY_ERRORS = (httpx.NetworkError, httpx.ConnectTimeout, httpx.RemoteProtocolError)


@dataclass(frozen=True, eq=False)
class Reconstruction:
    mask: np.ndarray  # uint8 [h, w] at the encoder's patch grid, 1 = masked
    masked_input: bytes  # PNG: the preprocessed image with the masked patches blanked
    reconstruction: bytes  # PNG: the model's reconstruction
    loss: float  # mean L1 over masked pixels, normalised pixel space


@dataclass(frozen=True)
class Health:
    live: bool  # the process answers HTTP
    ready: bool  # the model is loaded and warmed up, and not draining
    detail: str  # "ready", the server's error code, or "unreachable"


class _NoProgress:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoProgress()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        raise ImportError("progress=True needs tqdm: pip install tqdm") from None
    return tqdm(total=total, unit="img", desc="embed")


def _batches(items: list, size: int) -> list[tuple[int, list]]:
    """[(offset, items[offset:offset + size]), ...]."""
    return [(i, items[i : i + size]) for i in range(0, len(items), size)]


class _Common:
    def __init__(
        self,
        base_url: str | None,
        api_key: str | None,
        batch_size: int,
        max_concurrency: int,
        max_retries: int,
        backoff_s: float,
        max_backoff_s: float,
    ):
        if batch_size < 1 or max_concurrency < 1:
            raise ValueError("batch_size and max_concurrency must be at least 1")
        self.base_url = base_url or os.environ.get("SIMMIM_URL", DEFAULT_URL)
        api_key = api_key if api_key is not None else os.environ.get("SIMMIM_API_KEY")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.batch_size, self.max_concurrency = batch_size, max_concurrency
        self.max_retries, self.backoff_s, self.max_backoff_s = max_retries, backoff_s, max_backoff_s

    def _retry_delay(self, attempt: int, response: httpx.Response | None) -> float | None:
        """Seconds to wait before retry number attempt + 1, or None to give up."""
        if attempt >= self.max_retries:
            return None
        if response is not None:
            if response.status_code not in RETRY_STATUSES:
                return None
            if (seconds := retry_after(response)) is not None:
                return min(seconds, self.max_backoff_s)
        return min(self.max_backoff_s, self.backoff_s * 2**attempt) * random.uniform(0.5, 1)

    def _give_up(self, error: httpx.TransportError, attempts: int) -> ConnectionFailedError:
        return ConnectionFailedError(
            f"could not reach {self.base_url} after {attempts} "
            f"attempts: {type(error).__name__}: {error}"
        )

    # --- requests and answers --------------------------------------------------------------
    @staticmethod
    def _embed_request(images: list, normalize: bool) -> dict:
        return {
            "files": [("images", to_upload(x, f"image{i}")) for i, x in enumerate(images)],
            "data": {"normalize": str(normalize).lower(), "encoding": "base64"},
        }

    @staticmethod
    def _embeddings(response: httpx.Response) -> np.ndarray:
        body = response.json()
        vectors = [np.frombuffer(base64.b64decode(e), "<f4") for e in body["embeddings"]]
        return np.stack(vectors).astype(np.float32).reshape(len(vectors), body["dim"])

    @staticmethod
    def _similarity_lists(a: Sequence, b: Sequence | None) -> tuple[list, list | None]:
        a, b = list(a), None if b is None else list(b)
        if not a or b == []:
            raise ValueError("a (and b, when given) must hold at least one image")
        return a, b

    @staticmethod
    def _similarity_request(a: list, b: list | None) -> dict:
        files = [("a", to_upload(x, f"a{i}")) for i, x in enumerate(a)]
        files += [("b", to_upload(x, f"b{i}")) for i, x in enumerate(b or [])]
        return {"files": files}

    @staticmethod
    def _reconstruct_request(
        image, mask_ratio: float | None, seed: int | None, picture: bool
    ) -> dict:
        data = {k: str(v) for k, v in (("mask_ratio", mask_ratio), ("seed", seed)) if v is not None}
        headers = {"Accept": "image/png" if picture else "application/json"}
        return {"files": [("image", to_upload(image))], "data": data, "headers": headers}

    @staticmethod
    def _reconstruction(response: httpx.Response) -> Reconstruction:
        body = response.json()
        return Reconstruction(
            np.asarray(body["mask"], np.uint8),
            base64.b64decode(body["masked_input"]),
            base64.b64decode(body["reconstruction"]),
            float(body["loss"]),
        )

    @staticmethod
    def _at_offset(error: APIError, offset: int) -> APIError:
        """Make error.index count in the caller's whole list, not in one batch."""
        if error.index is not None:
            error.index += offset
        return error


class Client(_Common):
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

    def _request(self, method: str, path: str, **kwargs) -> httpx.Response:
        for attempt in range(self.max_retries + 1):
            try:
                response = self._http.request(method, path, **kwargs)
            except RETRY_ERRORS as e:
                delay = self._retry_delay(attempt, None)
                if delay is None:
                    raise self._give_up(e, attempt + 1) from e
            else:
                if not response.is_error:
                    return response
                delay = self._retry_delay(attempt, response)
                if delay is None:
                    raise error_from_response(response)
            time.sleep(delay)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def embed(
        self,
        images: Iterable,
        *,
        normalize: bool = True,
        batch_size: int | None = None,
        progress: bool = False,
    ) -> np.ndarray:
        """Images -> float32 [N, D] embeddings, in order (L2-normalised unless normalize=False)."""
        images = list(images)
        if not images:
            raise ValueError("no images to embed")
        bar = _progress(len(images), progress)

        def send(job: tuple[int, list]) -> np.ndarray:
            offset, batch = job
            try:
                response = self._request("POST", "/embed", **self._embed_request(batch, normalize))
            except APIError as e:
                raise self._at_offset(e, offset) from None
            bar.update(len(batch))
            return self._embeddings(response)

        jobs = _batches(images, batch_size or self.batch_size)
        pool = ThreadPoolExecutor(min(self.max_concurrency, len(jobs)))
        try:
            return np.concatenate(list(pool.map(send, jobs)))
        finally:
            pool.shutdown(cancel_futures=True)  # after an error: send no more batches
            bar.close()

    def similarity(self, a: Sequence, b: Sequence | None = None) -> np.ndarray:
        """float32 [len(a), len(b)] cosine similarities (b omitted: a against itself). One
        /similarity request when a and b fit in batch_size images, else embed() and compare."""
        a, b = self._similarity_lists(a, b)
        if len(a) + len(b or []) <= self.batch_size:
            response = self._request("POST", "/similarity", **self._similarity_request(a, b))
            return np.asarray(response.json()["scores"], np.float32)
        ea = self.embed(a)
        return ea @ (ea if b is None else self.embed(b)).T

    def reconstruct(
        self, image, *, mask_ratio: float | None = None, seed: int | None = None
    ) -> Reconstruction:
        """SimMIM's masked reconstruction of one image (mask_ratio default: the model's)."""
        return self._reconstruction(
            self._request(
                "POST", "/reconstruct", **self._reconstruct_request(image, mask_ratio, seed, False)
            )
        )

    def reconstruct_picture(
        self, image, *, mask_ratio: float | None = None, seed: int | None = None
    ) -> bytes:
        """One PNG: original | masked input | reconstruction, side by side."""
        return self._request(
            "POST", "/reconstruct", **self._reconstruct_request(image, mask_ratio, seed, True)
        ).content

    def info(self) -> dict:
        """The model card, the server's settings and runtime."""
        return self._request("GET", "/info").json()

    def health(self) -> Health:
        """Live and ready, asked once each (no retries)."""
        try:
            live = self._http.get("/health/live")
            ready = self._http.get("/health/ready")
        except httpx.TransportError:
            return Health(False, False, "unreachable")
        detail = "ready" if ready.is_success else error_from_response(ready).code
        return Health(live.is_success, ready.is_success, detail)


class AsyncClient(_Common):
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

    async def _request(self, method: str, path: str, **kwargs) -> httpx.Response:
        for attempt in range(self.max_retries + 1):
            try:
                response = await self._http.request(method, path, **kwargs)
            except RETRY_ERRORS as e:
                delay = self._retry_delay(attempt, None)
                if delay is None:
                    raise self._give_up(e, attempt + 1) from e
            else:
                if not response.is_error:
                    return response
                delay = self._retry_delay(attempt, response)
                if delay is None:
                    raise error_from_response(response)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def embed(
        self,
        images: Iterable,
        *,
        normalize: bool = True,
        batch_size: int | None = None,
        progress: bool = False,
    ) -> np.ndarray:
        images = list(images)
        if not images:
            raise ValueError("no images to embed")
        bar = _progress(len(images), progress)
        slots = asyncio.Semaphore(self.max_concurrency)

        async def send(offset: int, batch: list) -> np.ndarray:
            async with slots:
                try:
                    response = await self._request(
                        "POST", "/embed", **self._embed_request(batch, normalize)
                    )
                except APIError as e:
                    raise self._at_offset(e, offset) from None
            bar.update(len(batch))
            return self._embeddings(response)

        tasks = [
            asyncio.ensure_future(send(offset, batch))
            for offset, batch in _batches(images, batch_size or self.batch_size)
        ]
        try:
            return np.concatenate(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:  # after an error: send no more batches
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        finally:
            bar.close()

    async def similarity(self, a: Sequence, b: Sequence | None = None) -> np.ndarray:
        a, b = self._similarity_lists(a, b)
        if len(a) + len(b or []) <= self.batch_size:
            response = await self._request("POST", "/similarity", **self._similarity_request(a, b))
            return np.asarray(response.json()["scores"], np.float32)
        ea = await self.embed(a)
        return ea @ (ea if b is None else await self.embed(b)).T

    async def reconstruct(
        self, image, *, mask_ratio: float | None = None, seed: int | None = None
    ) -> Reconstruction:
        return self._reconstruction(
            await self._request(
                "POST", "/reconstruct", **self._reconstruct_request(image, mask_ratio, seed, False)
            )
        )

    async def reconstruct_picture(
        self, image, *, mask_ratio: float | None = None, seed: int | None = None
    ) -> bytes:
        return (
            await self._request(
                "POST", "/reconstruct", **self._reconstruct_request(image, mask_ratio, seed, True)
            )
        ).content

    async def info(self) -> dict:
        return (await self._request("GET", "/info")).json()

    async def health(self) -> Health:
        try:
            live = await self._http.get("/health/live")
            ready = await self._http.get("/health/ready")
        except httpx.TransportError:
            return Health(False, False, "unreachable")
        detail = "ready" if ready.is_success else error_from_response(ready).code
        return Health(live.is_success, ready.is_success, detail)
