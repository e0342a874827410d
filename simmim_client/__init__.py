"""Python client for the simmim service: embeddings, similarities and reconstructions over HTTP.

Needs only httpx and numpy (Pillow to pass PIL images, tqdm for progress=True).

    from simmim_client import Client
    with Client("http://127.0.0.1:8000") as client:
        vectors = client.embed(["a.jpg", "b.png"])        # float32 [2, D], L2-normalised
"""

from .client import AsyncClient, Client
from .errors import (
    APIError,
    AuthenticationError,
    BadRequestError,
    ConnectionFailedError,
    GatewayTimeoutError,
    InvalidRequestError,
    PayloadTooLargeError,
    QueueFullError,
    ServerError,
    ServiceUnavailableError,
    SimmimError,
    UnsupportedMediaTypeError,
)
from .images import encode_png
from .protocol import EmbedResult, Health, Reconstruction

__all__ = [
    "AsyncClient",
    "Client",
    "EmbedResult",
    "Health",
    "Reconstruction",
    "APIError",
    "AuthenticationError",
    "BadRequestError",
    "ConnectionFailedError",
    "GatewayTimeoutError",
    "InvalidRequestError",
    "PayloadTooLargeError",
    "QueueFullError",
    "ServerError",
    "ServiceUnavailableError",
    "SimmimError",
    "UnsupportedMediaTypeError",
    "encode_png",
]
