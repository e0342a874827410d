"""The Kubernetes manifests (deploy/k8s), checked without a cluster: `kubectl kustomize` renders
each overlay, every rendered object validates against the Kubernetes API schemas
(kubernetes-validate, offline, strict: unknown fields fail) and the KEDA ScaledObject against
a ScaledObject schema written from KEDA's documentation (deploy/k8s/schemas), and the rendered
objects keep the promises
of deploy/k8s/README.md: probes on the health endpoints, non-root, read-only root filesystem,
a grace period that covers the preStop sleep and the drain, memory and CPU bounds, every setting
of the service in the ConfigMap, an autoscaler on the queue metric, a GPU for the GPU overlay.

Needs kubectl (with kustomize >= 5) and promtool-free Python packages only; skipped only where
kubectl is not installed (tests/run.sh installs it when run as root).
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
kubernetes_validate = pytest.importorskip("kubernetes_validate")
jsonschema = pytest.importorskip("jsonschema")
promql_parser = pytest.importorskip("promql_parser")

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu")
KEDA_SCHEMA = K8S / "schemas" / "keda-scaledobject-v1alpha1.json"
# the oldest Kubernetes the manifests are meant for, and the newest kubernetes-validate knows
K8S_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
HEALTH = {"/health/live", "/health/ready"}

needs_kubectl = pytest.mark.skipif(
    shutil.which("kubectl") is None,
    reason="kubectl is not installed (tests/run.sh installs it when run as root)",
)


def render(path: Path) -> list[dict]:
    """`kubectl kustomize path` as a list of objects."""
    proc = subprocess.run(
        ["kubectl", "kustomize", str(path)], capture_output=True, text=True, timeout=120
    )
    if proc.returncode != 0:
        pytest.fail(f"kubectl kustomize {path} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def one(objects: list[dict], kind: str) -> dict:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def container(objects: list[dict]) -> dict:
    (c,) = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    return c


def settings_of(objects: list[dict]) -> dict[str, str]:
    """The ConfigMap the Deployment's envFrom names."""
    (source,) = container(objects)["envFrom"]
    name = source["configMapRef"]["name"]
    (cm,) = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == name]
    return cm["data"]


_SUFFIX = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
_SUFFIX.update(m=1e-3, T=1e12)


def quantity(q: str | int) -> float:
    """A Kubernetes quantity ('768Mi', '2', '500m') as a number (bytes or cores)."""
    m = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)([KMGT]i|[mkMGT])?", str(q))
    assert m, f"not a Kubernetes quantity: {q!r}"
    return float(m.group(1)) * _SUFFIX.get(m.group(2) or "", 1)


def strict(schema):
    """A copy of a CRD's structural schema that rejects unknown fields, as the API server does
    with strict field validation (kubectl's default): additionalProperties false wherever
    properties are listed and nothing else is said."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request) -> tuple[str, list[dict]]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed (tests/run.sh installs it when run as root)")
    return request.param, render(K8S / "overlays" / request.param)


@pytest.fixture(scope="module")
def cpu() -> list[dict]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed (tests/run.sh installs it when run as root)")
    return render(K8S / "overlays" / "cpu")


@pytest.fixture(scope="module")
def gpu() -> list[dict]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed (tests/run.sh installs it when run as root)")
    return render(K8S / "overlays" / "gpu")


@pytest.fixture(scope="module")
def with_model_pvc(tmp_path_factory) -> list[dict]:
    """The CPU overlay with the model-pvc component added, as deploy/k8s/README.md says."""
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed (tests/run.sh installs it when run as root)")
    k8s = tmp_path_factory.mktemp("deploy") / "k8s"
    shutil.copytree(K8S, k8s)
    kustomization = k8s / "overlays" / "cpu" / "kustomization.yaml"
    doc = yaml.safe_load(kustomization.read_text())
    doc["components"].append("../../components/model-pvc")
    kustomization.write_text(yaml.safe_dump(doc))
    return render(k8s / "overlays" / "cpu")


# --- rendering and schemas ---------------------------------------------------------------------
@needs_kubectl
def test_overlays_render_the_same_kinds(overlay):
    _, objects = overlay
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == sorted(
        [
            "Namespace",
            "ConfigMap",
            "Service",
            "Deployment",
            "PodDisruptionBudget",
            "ScaledObject",
        ]
    )
    assert {o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace"} == {
        one(objects, "Namespace")["metadata"]["name"]
    }


@needs_kubectl
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_core_object_validates_against_the_kubernetes_schemas(overlay, version):
    _, objects = overlay
    for obj in objects:
        if obj["apiVersion"].startswith("keda.sh/"):
            continue  # a CRD: the next test
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{obj['kind']} {obj['metadata']['name']} (Kubernetes {version}): {e}")


@needs_kubectl
def test_scaled_object_validates_against_the_keda_crd_schema(overlay):
    _, objects = overlay
    schema = strict(json.loads(KEDA_SCHEMA.read_text()))
    so = one(objects, "ScaledObject")
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    jsonschema.validate(so, schema)


def test_the_keda_schema_check_rejects_an_unknown_field():
    """The strict schema really checks: a misspelt field of the ScaledObject fails."""
    schema = strict(json.loads(KEDA_SCHEMA.read_text()))
    so = yaml.safe_load((K8S / "components" / "keda" / "scaledobject.yaml").read_text())
    jsonschema.validate(so, schema)
    bad = copy.deepcopy(so)
    bad["spec"]["minReplicas"] = bad["spec"].pop("minReplicaCount")
    with pytest.raises(jsonschema.ValidationError, match="minReplicas"):
        jsonschema.validate(bad, schema)
    bad = copy.deepcopy(so)
    bad["spec"]["triggers"][0]["metadata"]["threshold"] = 32  # metadata values are strings
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


@needs_kubectl
def test_kubectl_kustomize_is_recent_enough():
    out = subprocess.run(
        ["kubectl", "version", "--client", "-o", "json"], capture_output=True, text=True
    ).stdout
    version = json.loads(out).get("kustomizeVersion", "v0")
    assert int(version.lstrip("v").split(".")[0]) >= 5, (
        f"kubectl's kustomize is {version}; the manifests use components and labels "
        "(kustomize >= 5, kubectl >= 1.27)"
    )


# --- the pod -----------------------------------------------------------------------------------
@needs_kubectl
def test_probes_point_at_the_health_endpoints(overlay):
    c = container(overlay[1])
    port_names = {p["name"] for p in c["ports"]}
    for kind, path in [
        ("startupProbe", "/health/ready"),
        ("readinessProbe", "/health/ready"),
        ("livenessProbe", "/health/live"),
    ]:
        probe = c[kind]["httpGet"]
        assert probe["path"] == path, f"{kind} checks {probe['path']}, not {path}"
        assert probe["port"] in port_names | {8000}


@needs_kubectl
def test_runs_as_non_root_with_a_read_only_root_filesystem(overlay):
    spec = one(overlay[1], "Deployment")["spec"]["template"]["spec"]
    pod, box = spec["securityContext"], container(overlay[1])["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert pod["runAsUser"] == 10001 == pod["runAsGroup"]  # the images' user simmim
    assert box["readOnlyRootFilesystem"] is True
    assert box["allowPrivilegeEscalation"] is False
    assert box["capabilities"]["drop"] == ["ALL"]


@needs_kubectl
def test_the_writable_paths_are_empty_dir_volumes(overlay):
    """/tmp (prometheus_client's multiprocess directory of the server processes) is the only
    writable path the service needs; it is an emptyDir with a size limit."""
    spec = one(overlay[1], "Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container(overlay[1])["volumeMounts"]}
    tmp = volumes[mounts["/tmp"]]
    assert quantity(tmp["emptyDir"]["sizeLimit"]) > 0


@needs_kubectl
def test_grace_period_covers_the_prestop_sleep_and_the_drain(overlay):
    spec = one(overlay[1], "Deployment")["spec"]["template"]["spec"]
    command = container(overlay[1])["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep", command
    sleep_s = float(command[1])
    drain_s = float(settings_of(overlay[1])["SIMMIM_DRAIN_TIMEOUT_S"])
    assert sleep_s > 0
    assert spec["terminationGracePeriodSeconds"] > sleep_s + drain_s


@needs_kubectl
def test_memory_and_cpu_have_requests_and_limits(overlay):
    resources = container(overlay[1])["resources"]
    for what in ("memory", "cpu"):
        request = quantity(resources["requests"][what])
        limit = quantity(resources["limits"][what])
        assert 0 < request <= limit, f"{what}: request {request}, limit {limit}"


@needs_kubectl
def test_no_service_links_that_would_collide_with_the_simmim_prefix(overlay):
    """A Service named simmim would otherwise put SIMMIM_PORT=tcp://... into the pods."""
    spec = one(overlay[1], "Deployment")["spec"]["template"]["spec"]
    assert spec["enableServiceLinks"] is False


@needs_kubectl
def test_the_config_map_sets_every_setting_of_the_service(overlay):
    """Every SIMMIM_* in the ConfigMap is a real setting with a valid value, and every setting
    but the API key (from a Secret) is there: pydantic-settings ignores unknown variables, so a
    renamed setting would fail nowhere else."""
    pytest.importorskip("pydantic_settings")
    from service.settings import ENV_PREFIX, Settings

    data = settings_of(overlay[1])
    names = {k[len(ENV_PREFIX) :].lower(): v for k, v in data.items()}
    assert all(k.startswith(ENV_PREFIX) for k in data), sorted(data)
    assert set(names) == set(Settings.model_fields) - {"api_key"}
    settings = Settings(**names)  # every value valid, and the model validators pass
    assert settings.host == "0.0.0.0" and settings.api_key is None
    (port,) = container(overlay[1])["ports"]
    assert port["containerPort"] == settings.port
    key = {e["name"]: e for e in container(overlay[1])["env"]}["SIMMIM_API_KEY"]
    assert key["valueFrom"]["secretKeyRef"]["optional"] is True


@needs_kubectl
def test_the_image_tag_is_the_project_version(overlay):
    version = re.search(r'^version = "(.+)"$', (REPO / "pyproject.toml").read_text(), re.M)[1]
    assert container(overlay[1])["image"].endswith(f":{version}")


# --- rollout, disruption, service ---------------------------------------------------------------
@needs_kubectl
def test_rolling_updates_never_remove_a_ready_pod_first(overlay):
    strategy = one(overlay[1], "Deployment")["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"]["maxUnavailable"] == 0
    assert strategy["rollingUpdate"]["maxSurge"] >= 1


@needs_kubectl
def test_service_and_disruption_budget_select_the_pods(overlay):
    objects = overlay[1]
    pod_labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    service, pdb = one(objects, "Service"), one(objects, "PodDisruptionBudget")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] in {p["name"] for p in container(objects)["ports"]}
    so = one(objects, "ScaledObject")
    assert pdb["spec"]["maxUnavailable"] < so["spec"]["minReplicaCount"]


# --- the autoscaler -----------------------------------------------------------------------------
def _selectors(query: str) -> list:
    found = []
    promql_parser.walk(
        promql_parser.parse(query),
        lambda node: found.append(node) if isinstance(node, promql_parser.VectorSelector) else None,
    )
    return found


@needs_kubectl
def test_the_autoscaler_scales_the_deployment_on_queue_depth(overlay):
    objects = overlay[1]
    deployment, so = one(objects, "Deployment"), one(objects, "ScaledObject")
    assert so["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert "replicas" not in deployment["spec"], "KEDA owns the replica count"
    assert 2 <= so["spec"]["minReplicaCount"] <= so["spec"]["maxReplicaCount"]
    (trigger,) = so["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    assert float(trigger["metadata"]["threshold"]) > 0
    (selector,) = _selectors(trigger["metadata"]["query"])
    assert selector.name == "simmim_queue_depth"
    namespace = {m.name: m.value for m in selector.matchers.matchers}["namespace"]
    assert namespace == deployment["metadata"]["namespace"]


# --- the GPU overlay ---------------------------------------------------------------------------
@needs_kubectl
def test_the_gpu_overlay_requests_a_gpu_and_runs_the_gpu_image_on_cuda(gpu):
    c = container(gpu)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert c["image"].split(":")[0] == "simmim-service-gpu"
    settings = settings_of(gpu)
    assert settings["SIMMIM_PROVIDER"] == "cuda" and settings["SIMMIM_PROCESSES"] == "1"
    tolerations = one(gpu, "Deployment")["spec"]["template"]["spec"]["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations


@needs_kubectl
def test_the_cpu_overlay_runs_the_cpu_image_on_the_cpu_without_a_gpu(cpu):
    c = container(cpu)
    assert c["image"].split(":")[0] == "simmim-service"
    assert settings_of(cpu)["SIMMIM_PROVIDER"] == "cpu"
    assert "nvidia.com/gpu" not in c["resources"]["limits"]


# --- your own model from a volume ----------------------------------------------------------------
@needs_kubectl
def test_the_model_pvc_component_serves_a_model_from_a_read_only_claim(with_model_pvc):
    objects = with_model_pvc
    for obj in objects:
        if not obj["apiVersion"].startswith("keda.sh/"):
            kubernetes_validate.validate(obj, K8S_VERSIONS[0], strict=True)
    claim = one(objects, "PersistentVolumeClaim")
    assert claim["metadata"]["namespace"] == one(objects, "Deployment")["metadata"]["namespace"]
    spec = one(objects, "Deployment")["spec"]["template"]["spec"]
    (volume,) = [v for v in spec["volumes"] if "persistentVolumeClaim" in v]
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    (mount,) = [m for m in container(objects)["volumeMounts"] if m["name"] == volume["name"]]
    assert mount["readOnly"] is True
    model_dir = settings_of(objects)["SIMMIM_MODEL_DIR"]
    assert Path(model_dir).parent == Path(mount["mountPath"])
    assert settings_of(objects)["SIMMIM_PROVIDER"] == "cpu"  # the rest of the settings stay
