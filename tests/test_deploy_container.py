"""The CPU image run the way the Kubernetes pod runs it, with podman: the user, read-only root
filesystem, emptyDir volumes (as tmpfs mounts of their size limit), dropped capabilities, no
privilege escalation and settings of the rendered CPU overlay (deploy/k8s). It must get ready on
its startup probe's path within the probe's budget, serve, export metrics (its multiprocess
directory lives in the /tmp volume), refuse writes elsewhere, run its preStop command, and exit 0
on SIGTERM within the grace period that is left.

No cluster here: podman stands in for the kubelet. Needs kubectl and podman (CI runs
../shared/tools/container-setup.sh); skipped only where either is missing. The image is the one
tests/test_container.py builds (tag simmim-service:ci).
"""

from __future__ import annotations

import base64
import shutil
import time
import urllib.error
import urllib.request
import uuid

import pytest
from test_container import cpu_image, free_port, http, png_bytes, run  # noqa: F401
from test_deploy import K8S, container, one, quantity, render, settings_of

needs_tools = pytest.mark.skipif(
    shutil.which("podman") is None or shutil.which("kubectl") is None,
    reason="needs podman (../shared/tools/container-setup.sh) and kubectl (tests/run.sh)",
)


def podman_run_args(objects: list[dict]) -> tuple[list[str], int]:
    """`podman run` options that reproduce the rendered pod's container; and its port."""
    spec = one(objects, "Deployment")["spec"]["template"]["spec"]
    c = container(objects)
    pod, box = spec["securityContext"], c["securityContext"]
    args = ["--user", f"{pod['runAsUser']}:{pod['runAsGroup']}"]
    if box["readOnlyRootFilesystem"]:
        # podman would add writable /tmp, /var/tmp and /run by itself; the kubelet does not
        args += ["--read-only", "--read-only-tmpfs=false"]
    for cap in box["capabilities"]["drop"]:
        args += ["--cap-drop", cap]
    if box["allowPrivilegeEscalation"] is False:
        args += ["--security-opt", "no-new-privileges"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    for mount in c["volumeMounts"]:
        volume = volumes[mount["name"]]
        assert "emptyDir" in volume, f"the test knows emptyDir volumes only: {volume}"
        size = int(quantity(volume["emptyDir"]["sizeLimit"]))
        args += ["--tmpfs", f"{mount['mountPath']}:rw,size={size},mode=1777"]
    for key, value in settings_of(objects).items():
        args += ["--env", f"{key}={value}"]
    (port,) = c["ports"]
    return args, port["containerPort"]


def wait_for_path(url: str, deadline_s: float, log_hint) -> None:
    end = time.monotonic() + deadline_s
    last = "no answer yet"
    while time.monotonic() < end:
        try:
            if http("GET", url, timeout=2)[0] == 200:
                return
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code}"
        except (urllib.error.URLError, OSError) as e:
            last = f"{type(e).__name__}: {e}"
        time.sleep(0.25)
    pytest.fail(f"{url} not 200 within {deadline_s:.0f} s (last: {last}):\n{log_hint()}")


@pytest.mark.slow
@pytest.mark.container
@pytest.mark.timeout(1800)
@needs_tools
def test_the_image_serves_and_drains_under_the_pods_constraints(cpu_image):  # noqa: F811
    objects = render(K8S / "overlays" / "cpu")
    spec = one(objects, "Deployment")["spec"]["template"]["spec"]
    c = container(objects)
    args, container_port = podman_run_args(objects)
    name = f"simmim-pod-{uuid.uuid4().hex[:8]}"
    port = free_port()
    base = f"http://127.0.0.1:{port}"

    def logs() -> str:
        out = run(["podman", "logs", name], 60, check=False)
        return (out.stdout + out.stderr)[-3000:]

    run(
        ["podman", "run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:{container_port}"]
        + args
        + [cpu_image],
        timeout=120,
    )
    try:
        startup = c["startupProbe"]
        budget = startup["periodSeconds"] * startup["failureThreshold"]
        wait_for_path(base + startup["httpGet"]["path"], budget, logs)
        assert http("GET", base + c["livenessProbe"]["httpGet"]["path"])[0] == 200

        image = base64.b64encode(png_bytes(0, (96, 72))).decode()
        status, body = http("POST", f"{base}/embed", {"images": [image, image]})
        assert status == 200 and len(body["embeddings"]) == 2
        with urllib.request.urlopen(f"{base}/metrics", timeout=10) as resp:
            metrics = resp.read().decode()
        assert 'simmim_requests_total{endpoint="/embed",status="200"}' in metrics

        # the root filesystem is read-only for the service's user; the volume is not
        home = run(["podman", "exec", name, "touch", "/home/simmim/probe"], 60, check=False)
        assert home.returncode != 0 and "Read-only file system" in home.stderr
        assert run(["podman", "exec", name, "touch", "/tmp/probe"], 60, check=False).returncode == 0
        assert run(["podman", "exec", name, "id", "-u"], 60).stdout.strip() == "10001"

        # termination as the kubelet does it: the preStop command, then SIGTERM; the rest of
        # the grace period is the most the drain may take
        command = c["lifecycle"]["preStop"]["exec"]["command"]
        t0 = time.monotonic()
        pre_stop = run(["podman", "exec", name, *command], 120, check=False)
        assert pre_stop.returncode == 0, f"preStop {command}: {pre_stop.stderr}"
        run(["podman", "kill", "--signal", "TERM", name], 60)
        left = spec["terminationGracePeriodSeconds"] - (time.monotonic() - t0)
        waited = run(["podman", "wait", name], timeout=max(left, 1) + 30)
        elapsed = time.monotonic() - t0
        assert waited.stdout.strip() == "0", f"exit status {waited.stdout.strip()}:\n{logs()}"
        assert elapsed < spec["terminationGracePeriodSeconds"], f"stopped after {elapsed:.1f} s"
    finally:
        run(["podman", "rm", "-f", "-t", "0", name], 120, check=False)
