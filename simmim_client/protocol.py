"""What the client does, free of I/O (DESIGN §5): requests built, long lists split into batches,
the retry rule, answers read. Written once; `Client` and `AsyncClient` only carry it out.

Every client method is a *flow*: a generator that yields steps and gets their outcomes back
(the pattern of httpx's Auth.auth_flow):
  Call        send this request; the outcome is the httpx.Response, or the httpx.TransportError
              the transport raised;
  Sleep       wait this many seconds (outcome None);
  Together    run these flows, at most max_concurrency at once, with an optional progress bar;
              the outcome is their results, in order (the first error is raised instead).
The flow's return value is the method's result; its exceptions are the method's.
"""

from __future__ import annotations

import base64
import os
import random
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
import numpy as np

from .errors import APIError, ConnectionFailedError, error_from_response, retry_after
from .images import Upload, to_upload

DEFAULT_URL = "http://127.0.0.1:8000"
RETRY_STATUSES = (429, 503)
RETRY_ERRORS = (httpx.NetworkError, httpx.ConnectTimeout, httpx.RemoteProtocolError)
# Errors that are one image's fault, and that on_error="skip" records instead of raising: read
# here (a missing file, an object that is not an image), or refused by the server with its
# index (400 invalid_image, 413 image_too_large).
READ_ERRORS = (OSError, TypeError, ValueError)
ON_ERROR = ("raise", "skip")
T = TypeVar("T")


@dataclass(frozen=True, eq=False)
class Reconstruction:
    mask: np.ndarray  # uint8 [h, w] at the encoder's patch grid, 1 = masked
    masked_input: bytes  # PNG: the preprocessed image with the masked patches blanked
    reconstruction: bytes  # PNG: the model's reconstruction
    loss: float  # mean L1 over masked pixels, normalised pixel space


@dataclass(frozen=True, eq=False)
class EmbedResult:
    """What embed(..., on_error="skip") could make: every image but those in `errors`."""

    vectors: np.ndarray  # float32 [M, D]: the images embedded, in your order
    indexes: np.ndarray  # int64 [M]: which of your images each row is
    errors: dict[int, Exception]  # your image's index -> why it was skipped (by index)


@dataclass(frozen=True)
class Health:
    live: bool  # the process answers HTTP
    ready: bool  # the model is loaded and warmed up, and not draining
    detail: str  # "ready", the server's error code, or "unreachable"


# --- steps ---------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Call:
    """One HTTP request (the keyword arguments of httpx's request())."""

    method: str
    path: str
    files: list | None = None
    data: dict | None = None
    headers: dict | None = None


@dataclass(frozen=True)
class Sleep:
    seconds: float


@dataclass(frozen=True, eq=False)
class Together:
    """Run `flows` concurrently; sizes: the images each carries, for the progress bar."""

    flows: list[Generator]
    sizes: list[int] = field(default_factory=list)
    progress: bool = False


Step = Call | Sleep | Together
Flow = Generator[Step, Any, T]


# --- the retry rule ------------------------------------------------------------------------
@dataclass(frozen=True)
class Retry:
    """Up to max_retries more attempts after 429, 503 and connection errors: the server's
    Retry-After when it gives one, else backoff_s * 2**attempt jittered to [1/2, 1] of that;
    never more than max_backoff_s."""

    max_retries: int
    backoff_s: float
    max_backoff_s: float

    def delay(self, attempt: int, response: httpx.Response | None) -> float | None:
        """Seconds to wait before attempt + 1 (counting from 0) after `response` (None: a
        connection error), or None to give up."""
        if attempt >= self.max_retries:
            return None
        if response is not None:
            if response.status_code not in RETRY_STATUSES:
                return None
            if (seconds := retry_after(response)) is not None:
                return min(seconds, self.max_backoff_s)
        return min(self.max_backoff_s, self.backoff_s * 2**attempt) * random.uniform(0.5, 1)


def exchange(
    call: Call, read: Callable[[httpx.Response], T], retry: Retry, url: str, offset: int = 0
) -> Flow[T]:
    """Send `call` (to the server at `url`) until it succeeds or the retry rule gives up;
    read(response) is the result. offset: where the request's images start in the caller's
    list (an error's index is moved by it). Raises the APIError for the status,
    ConnectionFailedError, or a transport error that is not retried (a read timeout: the
    server may be working on it)."""
    attempt = 0
    while True:
        outcome = yield call
        if isinstance(outcome, RETRY_ERRORS):
            delay = retry.delay(attempt, None)
            if delay is None:
                raise ConnectionFailedError(
                    f"could not reach {url} after {attempt + 1} attempts: "
                    f"{type(outcome).__name__}: {outcome}"
                ) from outcome
        elif isinstance(outcome, Exception):
            raise outcome
        elif outcome.is_error:
            delay = retry.delay(attempt, outcome)
            if delay is None:
                raise at_offset(error_from_response(outcome), offset)
        else:
            return read(outcome)
        yield Sleep(delay)
        attempt += 1


def at_offset(error: APIError, offset: int) -> APIError:
    """Make error.index count in the caller's whole list, not in one batch."""
    if error.index is not None:
        error.index += offset
    return error


# --- the client's methods, as flows --------------------------------------------------------
class ClientCore:
    """The configuration both clients share, and each of their methods as a flow."""

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

    def _exchange(
        self, call: Call, read: Callable[[httpx.Response], T], offset: int = 0
    ) -> Flow[T]:
        retry = Retry(self.max_retries, self.backoff_s, self.max_backoff_s)
        return exchange(call, read, retry, self.base_url, offset)

    def _embed(
        self, images, normalize: bool, batch_size: int | None, progress: bool, on_error: str
    ) -> Flow[np.ndarray | EmbedResult]:
        """float32 [N, D] (or with on_error="skip", an EmbedResult): requests of batch_size
        images, run together, results in order."""
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, not {on_error!r}")
        images = list(images)
        if not images:
            raise ValueError("no images to embed")
        size = batch_size or self.batch_size
        batches = [(i, images[i : i + size]) for i in range(0, len(images), size)]
        embed_batch = self._embed_batch if on_error == "raise" else self._embed_batch_skipping
        flows = [embed_batch(batch, normalize, offset) for offset, batch in batches]
        results = yield Together(flows, [len(batch) for _, batch in batches], progress)
        if on_error == "raise":
            return np.concatenate(results)
        vectors = [r.vectors for r in results if len(r.indexes)]
        if not vectors:  # nothing embedded: the width still comes from the model
            info = yield from self._info()
            vectors = [np.empty((0, info["model"]["embedding_dim"]), np.float32)]
        return EmbedResult(
            np.concatenate(vectors),
            np.concatenate([r.indexes for r in results]),
            dict(sorted((i, e) for r in results for i, e in r.errors.items())),
        )

    def _embed_batch(self, images: list, normalize: bool, offset: int) -> Flow[np.ndarray]:
        """One /embed request; its images are read (or encoded) only once it starts."""
        uploads = [to_upload(x, f"image{i}") for i, x in enumerate(images)]
        call = embed_call(uploads, normalize)
        return (yield from self._exchange(call, read_embeddings, offset))

    def _embed_batch_skipping(self, images: list, normalize: bool, offset: int) -> Flow:
        """_embed_batch, with the images that cannot be read here or are refused by the server
        (an error naming the image) left out and recorded: a request refused for one image is
        sent again without it, so a batch with k bad images costs k more requests, and the
        images before the bad one, already decoded once by the server, are decoded again."""
        errors: dict[int, Exception] = {}
        uploads: dict[int, Upload] = {}  # the batch's image index -> upload
        for i, x in enumerate(images):
            try:
                uploads[i] = to_upload(x, f"image{i}")
            except READ_ERRORS as e:
                errors[offset + i] = e
        todo = list(uploads)
        while todo:
            call = embed_call([uploads[i] for i in todo], normalize)
            try:
                vectors = yield from self._exchange(call, read_embeddings)
            except APIError as e:
                if e.index is None or not 0 <= e.index < len(todo):
                    raise  # not one image's fault (auth, limits, server): every batch fails
                e.index = offset + todo.pop(e.index)
                errors[e.index] = e
                continue
            return EmbedResult(vectors, np.array(todo, np.int64) + offset, errors)
        return EmbedResult(np.empty((0, 0), np.float32), np.empty(0, np.int64), errors)

    def _similarity(self, a: Sequence, b: Sequence | None) -> Flow[np.ndarray]:
        """float32 [len(a), len(b)]: one /similarity request when a and b fit in batch_size
        images, else both embedded (in batches) and compared here."""
        a, b = list(a), None if b is None else list(b)
        if not a or b == []:
            raise ValueError("a (and b, when given) must hold at least one image")
        if len(a) + len(b or []) <= self.batch_size:
            return (yield from self._exchange(similarity_call(a, b), read_scores))
        ea = yield from self._embed(a, True, None, False, "raise")
        eb = ea if b is None else (yield from self._embed(b, True, None, False, "raise"))
        return ea @ eb.T

    def _reconstruct(
        self, image, mask_ratio: float | None, seed: int | None, paste_visible: bool
    ) -> Flow:
        call = reconstruct_call(image, mask_ratio, seed, paste_visible, "application/json")
        return self._exchange(call, read_reconstruction)

    def _reconstruct_picture(
        self, image, mask_ratio: float | None, seed: int | None, paste_visible: bool
    ) -> Flow:
        call = reconstruct_call(image, mask_ratio, seed, paste_visible, "image/png")
        return self._exchange(call, lambda response: response.content)

    def _info(self) -> Flow[dict]:
        return self._exchange(Call("GET", "/info"), lambda response: response.json())

    @staticmethod
    def _health() -> Flow[Health]:
        """Live and ready, asked once each (no retries)."""
        live = yield Call("GET", "/health/live")
        ready = live if isinstance(live, Exception) else (yield Call("GET", "/health/ready"))
        if isinstance(ready, Exception):
            return Health(False, False, "unreachable")
        detail = "ready" if ready.is_success else error_from_response(ready).code
        return Health(live.is_success, ready.is_success, detail)


# --- requests and answers ------------------------------------------------------------------
def embed_call(uploads: list[Upload], normalize: bool) -> Call:
    files = [("images", upload) for upload in uploads]
    return Call(
        "POST", "/embed", files, {"normalize": str(normalize).lower(), "encoding": "base64"}
    )


def read_embeddings(response: httpx.Response) -> np.ndarray:
    """float32 [n, D] from base64 little-endian rows."""
    body = response.json()
    vectors = [np.frombuffer(base64.b64decode(e), "<f4") for e in body["embeddings"]]
    return np.stack(vectors).astype(np.float32).reshape(len(vectors), body["dim"])


def similarity_call(a: list, b: list | None) -> Call:
    files = [("a", to_upload(x, f"a{i}")) for i, x in enumerate(a)]
    files += [("b", to_upload(x, f"b{i}")) for i, x in enumerate(b or [])]
    return Call("POST", "/similarity", files)


def read_scores(response: httpx.Response) -> np.ndarray:
    return np.asarray(response.json()["scores"], np.float32)


def reconstruct_call(
    image, mask_ratio: float | None, seed: int | None, paste_visible: bool, accept: str
) -> Call:
    data = {k: str(v) for k, v in (("mask_ratio", mask_ratio), ("seed", seed)) if v is not None}
    if not paste_visible:
        data["paste_visible"] = "false"
    return Call("POST", "/reconstruct", [("image", to_upload(image))], data, {"Accept": accept})


def read_reconstruction(response: httpx.Response) -> Reconstruction:
    body = response.json()
    return Reconstruction(
        np.asarray(body["mask"], np.uint8),
        base64.b64decode(body["masked_input"]),
        base64.b64decode(body["reconstruction"]),
        float(body["loss"]),
    )


# --- progress ------------------------------------------------------------------------------
class _NoProgress:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, enabled: bool):
    """A tqdm bar over `total` images if enabled, else one that shows nothing."""
    if not enabled:
        return _NoProgress()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        raise ImportError("progress=True needs tqdm: pip install tqdm") from None
    return tqdm(total=total, unit="img", desc="embed")
