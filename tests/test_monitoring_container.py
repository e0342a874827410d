"""compose.yaml's `monitoring` profile, for real: build Prometheus from Debian's package
(deploy/monitoring/Dockerfile.prometheus), `podman-compose --profile monitoring up -d`, send a
few requests to the service, and check through Prometheus's HTTP API that it scrapes the service,
has loaded and evaluates every rule of deploy/monitoring/rules, and sees the requests; then take
everything down, also when a check fails.

Needs podman and podman-compose (CI runs ../shared/tools/container-setup.sh); skipped only where
podman is not installed. No registry is reachable here, so Prometheus's base image is the
stand-in python:3.11-slim-bookworm that the setup script builds (Debian bookworm as well; the
Dockerfile's default is debian:bookworm-slim). Images (simmim-service:ci, simmim-prometheus:ci)
stay cached.
"""

from __future__ import annotations

import base64
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

import pytest
from test_container import (  # noqa: F401
    BASE_IMAGE,
    COMPOSE_FILE,
    LOG_DIR,
    REPO,
    cpu_image,
    free_port,
    http,
    needs_podman,
    png_bytes,
    podman_compose,
    run,
    wait_ready,
)
from test_monitoring import rules

PROMETHEUS_IMAGE = "simmim-prometheus:ci"
DEADLINE_S = 120.0


@pytest.fixture(scope="module")
def prometheus_image() -> str:
    run(
        [
            "podman",
            "build",
            "--pull=never",
            "--build-arg",
            f"BASE_IMAGE={BASE_IMAGE}",
            "-f",
            str(REPO / "deploy" / "monitoring" / "Dockerfile.prometheus"),
            "-t",
            PROMETHEUS_IMAGE,
            str(REPO / "deploy" / "monitoring"),
        ],
        timeout=900,
    )
    return PROMETHEUS_IMAGE


@pytest.fixture
def monitoring_project(cpu_image, prometheus_image):  # noqa: F811
    """`podman-compose --profile monitoring up -d` on free ports; always taken down."""
    project = f"simmimmon-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    port, prometheus_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIMMIM_")}
    env.update(
        SIMMIM_PORT=str(port),
        SIMMIM_IMAGE=cpu_image,
        SIMMIM_PROMETHEUS_PORT=str(prometheus_port),
        SIMMIM_PROMETHEUS_IMAGE=prometheus_image,
        SIMMIM_PROMETHEUS_BASE_IMAGE=BASE_IMAGE,
    )
    compose = podman_compose() + ["--profile", "monitoring", "-f", str(COMPOSE_FILE)]
    compose += ["-p", project]
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    try:
        run(compose + ["up", "-d"], timeout=300, env=env)
        yield {
            "service": f"http://127.0.0.1:{port}",
            "prometheus": f"http://127.0.0.1:{prometheus_port}",
        }
    finally:
        for name in ("simmim", "prometheus"):
            logs = run(["podman", "logs", f"{project}_{name}_1"], 60, check=False)
            (LOG_DIR / f"{project}_{name}.log").write_text(logs.stdout + logs.stderr)
        run(compose + ["down", "-v", "-t", "10"], timeout=300, env=env, check=False)
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


def api(prometheus: str, path: str, **params) -> dict:
    """GET Prometheus's HTTP API; its `data` (fails on an error status)."""
    url = f"{prometheus}/api/v1/{path}"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = json.loads(resp.read())
    assert body["status"] == "success", body
    return body["data"]


def status(url: str) -> int:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.status


def eventually(check, what: str, deadline_s: float = DEADLINE_S):
    """Poll check() (returning a truthy value or raising AssertionError) until it holds."""
    end = time.monotonic() + deadline_s
    last: object = None
    while time.monotonic() < end:
        try:
            value = check()
            if value:
                return value
            last = value
        except (AssertionError, urllib.error.URLError, OSError) as e:
            last = e
        time.sleep(1)
    pytest.fail(f"{what} not within {deadline_s:.0f} s (last: {last!r}); logs in {LOG_DIR}")


@pytest.mark.slow
@pytest.mark.container
@pytest.mark.timeout(1800)
@needs_podman
def test_prometheus_scrapes_the_service_and_evaluates_the_rules(monitoring_project):
    service, prometheus = monitoring_project["service"], monitoring_project["prometheus"]
    wait_ready(service, 180, f"logs in {LOG_DIR} (written at teardown)")
    eventually(lambda: status(f"{prometheus}/-/ready") == 200, "Prometheus ready")

    image = base64.b64encode(png_bytes(0, (64, 48))).decode()
    sent = 5
    for _ in range(sent):
        assert http("POST", f"{service}/embed", {"images": [image]})[0] == 200

    def target_up():
        targets = api(prometheus, "targets")["activeTargets"]
        assert [t["labels"]["job"] for t in targets] in ([], ["simmim"]), targets
        return targets and targets[0]["health"] == "up"

    eventually(target_up, "the simmim target up")

    def requests_seen():
        query = 'sum(simmim_requests_total{endpoint="/embed",status="200"})'
        result = api(prometheus, "query", query=query)["result"]
        return result and float(result[0]["value"][1]) >= sent

    eventually(requests_seen, f"{sent} /embed requests in Prometheus")

    expected = {r.get("record") or r.get("alert") for r in rules()}

    def rules_evaluated():
        groups = api(prometheus, "rules")["groups"]
        loaded = {r["name"]: r for g in groups for r in g["rules"]}
        assert set(loaded) == expected, sorted(set(loaded) ^ expected)
        bad = {n: r.get("lastError") for n, r in loaded.items() if r["health"] != "ok"}
        assert not bad, bad
        return all(r["lastEvaluation"] != "0001-01-01T00:00:00Z" for r in loaded.values())

    eventually(rules_evaluated, "every rule loaded and evaluated without error")

    def one_ready_replica():
        result = api(prometheus, "query", query="simmim:replicas_ready:sum")["result"]
        return result and float(result[0]["value"][1]) == 1.0

    eventually(one_ready_replica, "simmim:replicas_ready:sum == 1")
    firing = [a["labels"]["alertname"] for a in api(prometheus, "alerts")["alerts"]]
    assert not firing, f"alerts on a healthy, idle service: {firing}"
