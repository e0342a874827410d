"""The monitoring files (deploy/monitoring) and the autoscaler's query, against the real service.

promtool (Debian's `prometheus` package) checks the rules and the compose Prometheus
configuration and runs the rules' unit tests; a real `python -m simmim_cli serve` (2 server
processes, as deployed) answers a few requests, and every metric that the Grafana dashboard,
the rules and the KEDA trigger name must be among the series its /metrics exports, with the
labels they select on. promtool tests are skipped only where promtool is not installed
(tests/run.sh installs it when run as root).
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from service_fixtures import ServerProcess, png_bytes

yaml = pytest.importorskip("yaml")
promql_parser = pytest.importorskip("promql_parser")

REPO = Path(__file__).resolve().parents[1]
MONITORING = REPO / "deploy" / "monitoring"
RULES = MONITORING / "rules" / "simmim.rules.yml"
RULES_TEST = MONITORING / "simmim.rules.test.yml"
PROMETHEUS_CONFIG = MONITORING / "prometheus.yml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
SCALED_OBJECT = REPO / "deploy" / "k8s" / "components" / "keda" / "scaledobject.yaml"
OPERATIONS = REPO / "docs" / "operations.md"
# series that Prometheus makes itself, per target
SCRAPE_SERIES = {"up"}
# labels that Prometheus or Kubernetes service discovery attach to every scraped series
TARGET_LABELS = {"job", "instance", "namespace", "pod"}

needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool is not installed (Debian's prometheus package; tests/run.sh installs it "
    "when run as root)",
)


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["promtool", *args], cwd=MONITORING, capture_output=True, text=True, timeout=120
    )


# --- the queries ---------------------------------------------------------------------------------
def rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def dashboard_queries() -> list[str]:
    """Every PromQL expression of the dashboard, Grafana's variables replaced by values."""
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":  # label_values(METRIC, LABEL)
            metric = re.fullmatch(r"label_values\((\w+),\s*\w+\)", var["query"]["query"])
            assert metric, var["query"]
            exprs.append(metric.group(1))
    exprs = [re.sub(r"\$__rate_interval", "5m", e) for e in exprs]
    return [re.sub(r"\$\{?\w+\}?", ".+", e) for e in exprs]


def queries() -> dict[str, list[str]]:
    so = yaml.safe_load(SCALED_OBJECT.read_text())
    return {
        "dashboard": dashboard_queries(),
        "rules": [r["expr"] for r in rules()],
        "autoscaler": [t["metadata"]["query"] for t in so["spec"]["triggers"]],
    }


def selectors(expr: str) -> list:
    """The vector selectors of a PromQL expression (metric name + label matchers)."""
    found = []
    promql_parser.walk(
        promql_parser.parse(expr),
        lambda node: found.append(node) if isinstance(node, promql_parser.VectorSelector) else None,
    )
    return found


def test_every_query_parses_and_names_a_metric():
    for where, exprs in queries().items():
        assert exprs, where
        for expr in exprs:
            found = selectors(expr)
            assert found and all(s.name for s in found), f"{where}: {expr}"


def test_the_dashboard_uses_only_recording_rules_that_exist():
    recorded = {r["record"] for r in rules() if "record" in r}
    for where, exprs in queries().items():
        for expr in exprs:
            for s in selectors(expr):
                if ":" in s.name:
                    assert s.name in recorded, f"{where}: {s.name} is recorded by no rule"


# --- promtool -----------------------------------------------------------------------------------
@needs_promtool
def test_promtool_accepts_the_rules():
    proc = promtool("check", "rules", str(RULES))
    assert proc.returncode == 0, proc.stdout + proc.stderr


@needs_promtool
def test_the_rules_pass_their_unit_tests():
    proc = promtool("test", "rules", str(RULES_TEST))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


@needs_promtool
def test_promtool_accepts_the_compose_prometheus_config():
    proc = promtool("check", "config", str(PROMETHEUS_CONFIG))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_alert_is_labelled_annotated_and_documented():
    docs = OPERATIONS.read_text()
    alerts = [r for r in rules() if "alert" in r]
    assert {"warning", "critical"} >= {r["labels"]["severity"] for r in alerts}
    for r in alerts:
        assert r["annotations"]["summary"] and r["annotations"]["description"], r["alert"]
        assert r["alert"] in docs, f"docs/operations.md does not explain {r['alert']}"


# --- against a live server ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, list[dict[str, str]]]:
    """{series name: the label sets of its samples} from /metrics of `python -m simmim_cli serve`
    with the embedded model and 2 server processes (as deployed on 2 CPUs: prometheus_client's
    multiprocess mode, which leaves the process_* metrics out), after one request to each API
    endpoint, a bad one and a health check."""
    from prometheus_client.parser import text_string_to_metric_families

    from service.settings import default_model_path

    serve = [sys.executable, "-m", "simmim_cli", "serve"]
    with ServerProcess(
        default_model_path(), tmp_path_factory.mktemp("monitoring"), program=serve, processes=2
    ) as server:
        server.wait_ready()
        image = base64.b64encode(png_bytes(0)).decode()
        for path, body in [
            ("/embed", {"images": [image, image]}),
            ("/similarity", {"a": [image]}),
            ("/reconstruct", {"image": image, "seed": 0}),
            ("/embed", {"images": ["not an image"]}),
        ]:
            assert server.http.post(path, json=body).status_code in (200, 400)
        assert server.http.get("/health/ready").status_code == 200
        text = server.http.get("/metrics").text
    out: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(sample.labels)
    return out


@pytest.mark.timeout(300)
def test_every_metric_the_queries_name_is_exported(exported):
    recorded = {r["record"] for r in rules() if "record" in r}
    for where, exprs in queries().items():
        for expr in exprs:
            for s in selectors(expr):
                if s.name in recorded | SCRAPE_SERIES:
                    continue
                assert s.name in exported, (
                    f"{where} uses {s.name}, which the service does not export: {expr}"
                )


@pytest.mark.timeout(300)
def test_every_label_the_queries_select_on_is_exported(exported):
    for where, exprs in queries().items():
        for expr in exprs:
            for s in selectors(expr):
                if s.name not in exported:
                    continue
                labels = {m.name for m in s.matchers.matchers} - TARGET_LABELS
                has = {name for sample in exported[s.name] for name in sample}
                assert labels <= has, f"{where}: {s.name} has no label {labels - has}: {expr}"


@pytest.mark.timeout(300)
def test_requests_are_labelled_by_numeric_status_and_path(exported):
    """The rules match status="429", status=~"5.." and leave out endpoint=~"/health/.*|/metrics":
    the service must label requests by the number and by the route's path."""
    samples = exported["simmim_requests_total"]
    statuses = {s["status"] for s in samples}
    endpoints = {s["endpoint"] for s in samples}
    assert {"200", "400"} <= statuses and all(re.fullmatch(r"[1-5][0-9][0-9]", x) for x in statuses)
    assert {"/embed", "/similarity", "/reconstruct", "/health/ready"} <= endpoints
