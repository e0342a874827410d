"""Serving settings: SIMMIM_* environment variables, read once at start-up, then frozen.

Each field's description is also its `simmim serve --help` text; flags override the environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "SIMMIM_"


def default_model_path() -> Path:
    """The embedded default model shipped inside the package."""
    return Path(__file__).parent / "default_model"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, frozen=True, extra="forbid", protected_namespaces=()
    )

    model_dir: Path = Field(
        default_factory=default_model_path,
        description="model directory to serve (model.json + ONNX files); "
        "default: the model embedded in the package",
    )
    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0: every interface)")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on")
    provider: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="onnxruntime execution provider: auto (CUDA when onnxruntime-gpu "
        "and a GPU are present, else CPU), cpu or cuda",
    )
    processes: int = Field(
        0,
        ge=0,
        description="server processes sharing the port, each "
        "with its own event loop, batcher and copy of "
        "the model (0: 2 on a CPU with at least 2 "
        "cores, else 1; 1 on CUDA). Two processes "
        "parse, decode and answer requests in "
        "parallel, which pays for small images",
    )
    workers: int = Field(
        0,
        ge=0,
        description="model calls that may run at once in each "
        "process, on one shared onnxruntime session (0: "
        "2 if the process's share of the CPUs is at "
        "least 2, else 1; 1 on CUDA). Two calls of "
        "threads/2 each keep the cores busy while one "
        "is preempted; 1 gives the lowest latency for a "
        "lone request",
    )
    threads: int = Field(
        0,
        ge=0,
        description="onnxruntime intra-op threads per model call (0: "
        "the CPUs this server may use, container CPU "
        "quota included, divided among its processes "
        "and their model calls)",
    )
    int8: bool = Field(
        False,
        description="embed with encoder.int8.onnx (dynamically quantised) instead of encoder.onnx",
    )
    max_batch_size: int = Field(
        32, ge=1, description="most images per model call; the warm-up runs one batch of this size"
    )
    tune_batch_size: bool = Field(
        True,
        description="at start-up, time the model at batch 1, "
        "2, 4, ... up to max_batch_size (best of 3 "
        "timings each) and cap "
        "batches at the largest size within 5% of "
        "the fastest img/s (on a CPU, large batches "
        "can be slower); false: no cap",
    )
    max_wait_ms: float = Field(
        5.0,
        ge=0,
        description="longest an image waits for others to "
        "join its batch, in milliseconds (only "
        "while other requests are being decoded)",
    )
    max_queue: int = Field(
        512,
        ge=1,
        description="most images admitted and not yet answered, "
        "per task (embed, reconstruct); beyond it: 429",
    )
    max_queue_wait_s: float = Field(
        0.25,
        gt=0,
        description="admit a request only while the images queued before it would be "
        "answered within this many seconds (estimated from the rate at which the process "
        "has been getting through its queue); beyond it: 429 at once, before its body is "
        "read",
    )
    request_timeout_s: float = Field(
        30.0,
        gt=0,
        description="a request still waiting for results this many seconds after its "
        "body arrived (decoding and queueing included) gets 504",
    )
    max_request_bytes: int = Field(
        20_000_000, ge=1, description="largest request body, in bytes (413 beyond)"
    )
    max_body_bytes_in_flight: int = Field(
        64_000_000,
        ge=1,
        description="most bytes of request bodies held at once by each server process: "
        "each admitted request counts its declared length (max_request_bytes when "
        "chunked) until it is answered; beyond it: 429 at once",
    )
    max_images: int = Field(64, ge=1, description="most images in one request (413 beyond)")
    max_pixels: int = Field(
        40_000_000,
        ge=1,
        description="most pixels in one image, checked "
        "from its header before decoding "
        "(413 beyond)",
    )
    max_decode_pixels: int = Field(
        40_000_000,
        ge=1,
        description="most pixels being decoded at once by each server process (width x "
        "height from each image's header); an image waits for room, within the request "
        "timeout, and one larger than this gets 413. With the decode threads it bounds "
        "the memory of decoding (docs/service.md, Memory)",
    )
    decode_threads: int = Field(
        4, ge=1, description="threads that decode and preprocess images (and encode result PNGs)"
    )
    max_connections: int = Field(
        1000,
        ge=1,
        description="most open connections per server process (fewer if the limit on open "
        "files is lower); a connection beyond it is answered 503 and closed",
    )
    refusal_interval_ms: float = Field(
        100.0,
        ge=0,
        description="a keep-alive connection refused again (429 or 503 before its body is "
        "read) within this many milliseconds of its previous refusal gets the answer only "
        "once they have passed, and nothing more is read from it meanwhile: a client that "
        "resends a refused request at once gets one refusal per interval and connection "
        "instead of taking the server's CPU (0: every refusal at once)",
    )
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="a connection that has not sent a complete request head this many "
        "seconds after it opened, or after its previous response and the end of that "
        "request's body, is closed",
    )
    keep_alive_s: float = Field(
        5.0,
        gt=0,
        description="an idle connection (nothing received since its last response) is "
        "closed after this many seconds",
    )
    body_timeout_s: float = Field(
        30.0,
        gt=0,
        description="a request body not received in full this many seconds after its head: "
        "408, and the connection is closed",
    )
    drain_timeout_s: float = Field(
        30.0,
        ge=0,
        description="on SIGTERM/SIGINT, how long to let admitted requests finish; then the "
        "remaining connections are cut and the server exits",
    )
    api_key: SecretStr | None = Field(
        None,
        description="if set, every endpoint but /health/* needs 'Authorization: Bearer "
        "KEY' (/docs, /redoc and /openapi.json too, unless docs is public)",
    )
    docs: Literal["key", "public", "off"] = Field(
        "key",
        description="who may read /docs, /redoc and /openapi.json: key (whoever may call "
        "the API: anyone when no API key is set), public (anyone), off (not served)",
    )
    log_json: bool = Field(False, description="log one JSON object per line")
    log_requests: bool = Field(
        True,
        description="log one line per request (logger "
        "simmim.access: id, status, timings); false: "
        "only requests answered 4xx or 5xx, the rest "
        "at debug level",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_no_key(cls, value):
        return None if value in ("", None) else value

    @model_validator(mode="after")
    def _a_request_fits(self) -> Settings:
        if self.max_queue < self.max_images:
            raise ValueError(
                f"max_queue ({self.max_queue}) must be at least max_images "
                f"({self.max_images}), or a full-size request could never be "
                "admitted"
            )
        if self.max_body_bytes_in_flight < self.max_request_bytes:
            raise ValueError(
                f"max_body_bytes_in_flight ({self.max_body_bytes_in_flight}) must be at "
                f"least max_request_bytes ({self.max_request_bytes}), or a full-size "
                "request could never be admitted"
            )
        return self

    def public(self) -> dict:
        """The settings as JSON-ready values, the API key left out (only whether one is set),
        the model directory by its name only (no path of the server's filesystem)."""
        d = self.model_dump(mode="json", exclude={"api_key"})
        d["model_dir"] = self.model_dir.name
        d["api_key_set"] = self.api_key is not None
        return d
