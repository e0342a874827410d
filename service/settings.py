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
    request_timeout_s: float = Field(
        30.0,
        gt=0,
        description="a request still waiting for results after this many seconds gets 504",
    )
    max_request_bytes: int = Field(
        20_000_000, ge=1, description="largest request body, in bytes (413 beyond)"
    )
    max_images: int = Field(64, ge=1, description="most images in one request (413 beyond)")
    max_pixels: int = Field(
        40_000_000,
        ge=1,
        description="most pixels in one image, checked "
        "from its header before decoding "
        "(413 beyond)",
    )
    decode_threads: int = Field(
        4, ge=1, description="threads that decode and preprocess images (and encode result PNGs)"
    )
    drain_timeout_s: float = Field(
        30.0,
        ge=0,
        description="on SIGTERM/SIGINT, how long to let admitted requests finish before exiting",
    )
    api_key: SecretStr | None = Field(
        None,
        description="if set, every endpoint but /health/* "
        "and /docs needs 'Authorization: Bearer "
        "KEY'",
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
    def _queue_holds_a_request(self) -> Settings:
        if self.max_queue < self.max_images:
            raise ValueError(
                f"max_queue ({self.max_queue}) must be at least max_images "
                f"({self.max_images}), or a full-size request could never be "
                "admitted"
            )
        return self

    def public(self) -> dict:
        """The settings as JSON-ready values, the API key left out (only whether one is set)."""
        d = self.model_dump(mode="json", exclude={"api_key"})
        d["api_key_set"] = self.api_key is not None
        return d
