"""The container path, for real: build docker/Dockerfile with podman, `up` compose.yaml with
podman-compose, wait for /health/ready, embed images over HTTP and compare with the same model
run outside the container; everything is taken down afterwards, also when a check fails.

Needs podman, podman-compose and the base image python:3.11-slim-bookworm (CI runs
../shared/tools/container-setup.sh first). Skipped only where podman is not installed.
The built image (tag simmim-service:ci) and its layers stay cached between runs.
Figures (image size, build time, time from `up` to ready) are printed and written to
/tmp/simmim-container-test.json.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "compose.yaml"
DOCKERFILE = REPO / "docker" / "Dockerfile"
MODEL_DIR = REPO / "service" / "default_model"
IMAGE = "simmim-service:ci"
BASE_IMAGE = "docker.io/library/python:3.11-slim-bookworm"
MAX_IMAGE_BYTES = 400 * 1000 * 1000  # 400 MB, as `podman images` / `docker images` count
READY_DEADLINE_S = 180.0
RESULTS = Path("/tmp/simmim-container-test.json")
LOG_DIR = Path("/tmp/simmim-container-test-logs")

needs_podman = pytest.mark.skipif(
    shutil.which("podman") is None,
    reason="podman is not installed (CI installs it with ../shared/tools/container-setup.sh)",
)


def run(
    cmd: list[str],
    timeout: float,
    env: dict | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(
            f"{' '.join(cmd)} exited {proc.returncode}:\n"
            f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


def podman_compose() -> list[str]:
    exe = shutil.which("podman-compose")
    return [exe] if exe else [sys.executable, "-m", "podman_compose"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def record(**figures) -> None:
    """Merge figures into the results file and print them (visible with -s and in CI logs)."""
    data = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    data.update(figures)
    RESULTS.write_text(json.dumps(data, indent=2) + "\n")
    print("\n[container] " + ", ".join(f"{k}={v}" for k, v in figures.items()), flush=True)


def http(method: str, url: str, body: dict | None = None, timeout: float = 30.0):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"} if data else {}
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return resp.status, json.loads(resp.read() or b"null")


def png_bytes(seed: int, size: tuple[int, int]) -> bytes:
    """A real, non-square RGB picture (gradient + shapes), so that resize, crop and the
    color conversion of the preprocessing all take part."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack(
        [xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), np.full_like(xx, 40 + 60 * seed)],
        axis=-1,
    ).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, w - 8)), int(rng.integers(0, h - 8))
        x1, y1 = x0 + int(rng.integers(4, w // 2)), y0 + int(rng.integers(4, h // 2))
        draw.ellipse([x0, y0, x1, y1], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def local_embeddings(images: list[bytes], encoder_file: str) -> np.ndarray:
    """The same model directory, run here: the shared preprocessing + onnxruntime."""
    import onnxruntime as ort

    from simmim_core.model_dir import load_model_dir
    from simmim_core.preprocess import preprocess

    model = load_model_dir(MODEL_DIR)
    pixels = preprocess(images, model.preprocessing)
    session = ort.InferenceSession(
        str(MODEL_DIR / encoder_file), providers=["CPUExecutionProvider"]
    )
    return session.run(["embedding"], {"pixels": pixels})[0]


@pytest.fixture(scope="session")
def cpu_image() -> str:
    """Build docker/Dockerfile (layer cache kept); check and record its size."""
    if not (MODEL_DIR / "model.json").is_file():
        pytest.fail(
            f"{MODEL_DIR} has no model.json: the image embeds the default model, so it "
            "must exist before the build (see README.md, Containers)"
        )
    if run(["podman", "image", "exists", BASE_IMAGE], 60, check=False).returncode != 0:
        pytest.fail(f"base image {BASE_IMAGE} is missing: run ../shared/tools/container-setup.sh")
    t0 = time.monotonic()
    # --format docker: the OCI format has no HEALTHCHECK field, podman would drop it
    run(
        [
            "podman",
            "build",
            "--pull=never",
            "--format",
            "docker",
            "-f",
            str(DOCKERFILE),
            "-t",
            IMAGE,
            str(REPO),
        ],
        timeout=1500,
    )
    build_s = time.monotonic() - t0
    size = int(
        run(["podman", "image", "inspect", "--format", "{{.Size}}", IMAGE], 60).stdout.strip()
    )
    record(
        image=IMAGE,
        build_s=round(build_s, 1),
        image_size_bytes=size,
        image_size_mb=round(size / 1e6, 1),
    )
    return IMAGE


@pytest.fixture
def compose_project(cpu_image):
    """`podman-compose up -d` under a unique project name on a free port; always taken down."""
    project = f"simmimtest-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    port = free_port()
    # only the variables set here reach compose: a SIMMIM_* left in the CI environment must not
    # change what is tested
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIMMIM_")}
    env.update(SIMMIM_PORT=str(port), SIMMIM_IMAGE=cpu_image)
    compose = podman_compose() + ["-f", str(COMPOSE_FILE), "-p", project]
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log_file = LOG_DIR / f"{project}.log"
    try:
        t0 = time.monotonic()
        run(compose + ["up", "-d"], timeout=300, env=env)
        yield {
            "project": project,
            "port": port,
            "t0": t0,
            "compose": compose,
            "env": env,
            "log_file": log_file,
        }
    finally:
        logs = run(["podman", "logs", f"{project}_simmim_1"], 60, check=False)
        log_file.write_text(logs.stdout + logs.stderr)
        down = run(compose + ["down", "-v", "-t", "10"], timeout=300, env=env, check=False)
        # belt and braces: nothing of this project may outlive the test
        label = f"label=io.podman.compose.project={project}"
        left = run(["podman", "ps", "-a", "-q", "--filter", label], 60, check=False).stdout.split()
        if left:
            run(["podman", "rm", "-f", *left], 120, check=False)
        run(["podman", "pod", "rm", "-f", f"pod_{project}"], 60, check=False)
        run(["podman", "volume", "rm", "-f", f"{project}_simmim-models"], 60, check=False)
        run(["podman", "network", "rm", "-f", f"{project}_default"], 60, check=False)
        assert not run(
            ["podman", "ps", "-a", "-q", "--filter", label], 60, check=False
        ).stdout.split(), f"containers of {project} left behind"
        if down.returncode != 0:
            print(
                f"[container] podman-compose down exited {down.returncode}: {down.stderr[-1000:]}"
            )


def wait_ready(base: str, deadline_s: float, log_hint: str) -> None:
    end = time.monotonic() + deadline_s
    last = "no answer yet"
    while time.monotonic() < end:
        try:
            status, _ = http("GET", f"{base}/health/ready", timeout=2)
            if status == 200:
                return
            last = f"HTTP {status}"
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code}"
        except (urllib.error.URLError, OSError) as e:
            last = f"{type(e).__name__}: {e}"
        time.sleep(0.25)
    pytest.fail(f"/health/ready not 200 within {deadline_s:.0f} s (last: {last}); {log_hint}")


@pytest.mark.slow
@pytest.mark.container
@pytest.mark.timeout(1800)
@needs_podman
def test_compose_up_serves_the_embedded_model(compose_project, cpu_image):
    p = compose_project
    base = f"http://127.0.0.1:{p['port']}"
    wait_ready(base, READY_DEADLINE_S, f"container logs: {p['log_file']} (written at teardown)")
    up_to_ready_s = time.monotonic() - p["t0"]
    size = json.loads(RESULTS.read_text())["image_size_bytes"]
    record(up_to_ready_s=round(up_to_ready_s, 2), project=p["project"])
    assert size <= MAX_IMAGE_BYTES, f"image is {size / 1e6:.1f} MB, over 400 MB"

    container = f"{p['project']}_simmim_1"
    running = run(
        ["podman", "ps", "-q", "--filter", f"label=io.podman.compose.project={p['project']}"], 60
    ).stdout.split()
    assert len(running) == 1, f"a plain `up` must start only the simmim service: {running}"

    # the service runs the very model directory of this checkout, with the compose defaults
    status, info = http("GET", f"{base}/info")
    local_card = json.loads((MODEL_DIR / "model.json").read_text())
    assert info["model"]["files"] == local_card["files"], "the image holds another model"
    settings = info["settings"]
    # /info names the model directory without its path: /models/default
    assert settings["model_dir"] == "default" and settings["provider"] == "cpu"

    # a real image over HTTP == the same model run here (raw and L2-normalised)
    images = [png_bytes(0, (96, 72)), png_bytes(1, (40, 64))]
    payload = [base64.b64encode(b).decode() for b in images]
    status, raw = http("POST", f"{base}/embed", {"images": payload, "normalize": False})
    assert status == 200 and raw["dim"] == local_card["embedding_dim"]
    served = np.asarray(raw["embeddings"], dtype=np.float32)
    encoder = "encoder.int8.onnx" if settings["int8"] else "encoder.onnx"
    expected = local_embeddings(images, encoder)
    assert served.shape == expected.shape == (2, local_card["embedding_dim"])
    np.testing.assert_allclose(served, expected, atol=1e-5, rtol=0)
    _, unit = http("POST", f"{base}/embed", {"images": payload[:1]})
    np.testing.assert_allclose(
        unit["embeddings"][0], expected[0] / np.linalg.norm(expected[0]), atol=1e-5, rtol=0
    )

    # the page at / and its files (package data of the wheel), without a key
    for path, media_type in (
        ("/", "text/html"),
        ("/page/page.js", "javascript"),
        ("/page/page.css", "text/css"),
    ):
        with urllib.request.urlopen(base + path, timeout=10) as resp:
            assert resp.status == 200 and media_type in resp.headers["content-type"], path

    # the image's own HEALTHCHECK command, non-root, no torch
    hc = run(["podman", "healthcheck", "run", container], 60, check=False)
    assert hc.returncode == 0, f"HEALTHCHECK failed: {hc.stdout} {hc.stderr}"
    assert run(["podman", "exec", container, "id", "-u"], 60).stdout.strip() != "0"
    no_torch = run(["podman", "exec", container, "python", "-c", "import torch"], 60, check=False)
    assert no_torch.returncode != 0, "torch is installed in the serving image"


def _compose_defaults() -> dict[str, str]:
    yaml = pytest.importorskip("yaml")
    doc = yaml.safe_load(COMPOSE_FILE.read_text())
    out = {}
    for key, value in doc["x-serve-env"].items():
        m = re.fullmatch(r"\$\{(\w+):-([^}]*)\}", str(value)) if value is not None else None
        out[key] = m.group(2) if m else value
    return out


def test_compose_settings_match_the_service():
    """Every SIMMIM_* in compose.yaml is a real setting and its default is the service's own
    (pydantic-settings ignores unknown variables silently, so a renamed setting would not fail
    anywhere else)."""
    pytest.importorskip("pydantic_settings")
    from service.settings import ENV_PREFIX, Settings

    fields = Settings.model_fields
    overrides = {"model_dir": "/models/default", "provider": "cpu"}  # the image's choices
    for env_name, default in _compose_defaults().items():
        assert env_name.startswith(ENV_PREFIX), env_name
        name = env_name[len(ENV_PREFIX) :].lower()
        assert name in fields, f"compose.yaml sets {env_name}, which is no setting of the service"
        if default is None:  # passed through, e.g. the API key
            continue
        value = Settings(**{name: default}).model_dump()[name] if name != "model_dir" else None
        want = overrides.get(name, fields[name].get_default(call_default_factory=True))
        if name == "model_dir":
            assert default == want
        else:
            assert value == want, f"{env_name}: compose default {default!r}, service {want!r}"
    missing = (
        set(fields) - {k[len(ENV_PREFIX) :].lower() for k in _compose_defaults()} - {"host", "port"}
    )
    assert not missing, f"settings compose.yaml does not expose: {sorted(missing)}"


def _seconds(duration: str) -> float:
    """A compose duration ("45s", "1m30s") in seconds."""
    parts = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", duration)
    assert parts and duration, duration
    return int(parts.group(1) or 0) * 60 + int(parts.group(2) or 0)


def test_compose_gives_the_drain_time_to_finish_before_it_kills():
    """docker/podman compose stop sends SIGTERM, then SIGKILL after stop_grace_period: the
    service drains for SIMMIM_DRAIN_TIMEOUT_S, then cuts what is left and exits within about a
    second; the grace period must cover that with room to spare."""
    yaml = pytest.importorskip("yaml")
    services = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    drain_s = float(_compose_defaults()["SIMMIM_DRAIN_TIMEOUT_S"])
    for name in ("simmim", "simmim-gpu"):
        assert _seconds(services[name]["stop_grace_period"]) >= drain_s + 5, name


def test_compose_limits_the_memory_of_the_cpu_service_as_kubernetes_does():
    yaml = pytest.importorskip("yaml")
    limit = yaml.safe_load(COMPOSE_FILE.read_text())["services"]["simmim"]["mem_limit"]
    value = re.fullmatch(r"\$\{SIMMIM_MEMORY_LIMIT:-(\d+)g\}", limit).group(1)
    deployment = (REPO / "deploy" / "k8s" / "base" / "deployment.yaml").read_text()
    k8s = re.search(r"limits:\s*\n\s*cpu: \S+\s*\n\s*memory: (\d+)Gi", deployment).group(1)
    assert value == k8s
