"""The deployment manifests, offline: Kubernetes objects against the API schemas (kubernetes-validate,
strict), the Knative Service against the vendored CRD schema plus its autoscaling annotations, and the
numbers that must agree across files (concurrency, probe paths, shutdown grace, names, metric)."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from loraplex.cli import build_parser

kubernetes_validate = pytest.importorskip("kubernetes_validate.utils")

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "kubernetes"
KNATIVE = ROOT / "deploy" / "knative" / "service.yaml"
KNATIVE_SCHEMA = ROOT / "deploy" / "knative" / "schema" / "service-v1-openapi.yaml"
RAY_CONFIG = ROOT / "deploy" / "ray" / "serve_config.yaml"
CORE_FILES = ["deployment.yaml", "service.yaml", "hpa.yaml", "model-cache-pvc.yaml"]
K8S_VERSIONS = ["1.29.0", kubernetes_validate.latest_version()]  # oldest we support, newest schemas

DURATION = re.compile(r"^(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+$")  # Go's time.ParseDuration
NON_NEGATIVE_INT = re.compile(r"^\d+$")
POSITIVE_NUMBER = re.compile(r"^(?!0+(\.0+)?$)\d+(\.\d+)?$")
# Knative's per-revision autoscaling annotations and the form of each value (all values are strings).
KNATIVE_AUTOSCALING = {
    "autoscaling.knative.dev/class": re.compile(r"^(kpa|hpa)\.autoscaling\.knative\.dev$"),
    "autoscaling.knative.dev/metric": re.compile(r"^(concurrency|rps|cpu|memory)$"),
    "autoscaling.knative.dev/target": POSITIVE_NUMBER,
    "autoscaling.knative.dev/target-utilization-percentage": POSITIVE_NUMBER,
    "autoscaling.knative.dev/min-scale": NON_NEGATIVE_INT,
    "autoscaling.knative.dev/max-scale": NON_NEGATIVE_INT,
    "autoscaling.knative.dev/initial-scale": NON_NEGATIVE_INT,
    "autoscaling.knative.dev/activation-scale": NON_NEGATIVE_INT,
    "autoscaling.knative.dev/window": DURATION,
    "autoscaling.knative.dev/panic-window-percentage": POSITIVE_NUMBER,
    "autoscaling.knative.dev/panic-threshold-percentage": POSITIVE_NUMBER,
    "autoscaling.knative.dev/scale-down-delay": DURATION,
    "autoscaling.knative.dev/scale-to-zero-pod-retention-period": DURATION,
}


def _load(path: Path) -> dict:
    (doc,) = [d for d in yaml.safe_load_all(path.read_text()) if d]
    return doc


def _seconds(duration: str) -> float:
    units = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * units[u] for n, _, u in re.findall(r"(\d+(\.\d+)?)(ns|us|µs|ms|s|m|h)", duration))


def _serve_args(container: dict):
    """The container's args through the real `loraplex serve` parser (a flag it lacks fails here)."""
    args = container["args"]
    assert args[0] == "serve", args
    return build_parser().parse_args(args)


def _probe_path(container: dict, probe: str) -> str:
    return container[probe]["httpGet"]["path"]


def _structural(schema: dict) -> dict:
    """The CRD schema as the API server applies it: an object with `properties` keeps only those (unknown
    fields are pruned, which Knative's webhook then rejects), unless it preserves unknown fields."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if (
                node.get("type") == "object"
                and "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


@pytest.fixture(scope="module")
def deployment() -> dict:
    return _load(K8S / "deployment.yaml")


@pytest.fixture(scope="module")
def knative() -> dict:
    return _load(KNATIVE)


# ---- schemas ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", CORE_FILES)
def test_kubernetes_objects_validate_strictly(name, version):
    for resource in kubernetes_validate.resources_from_file(str(K8S / name)):
        kubernetes_validate.validate(resource, version, strict=True)


def test_strict_validation_catches_a_typo(deployment):
    broken = copy.deepcopy(deployment)
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)


def test_knative_service_matches_the_crd_schema(knative):
    schema = _structural(yaml.safe_load(KNATIVE_SCHEMA.read_text()))
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.Draft7Validator(schema).validate(knative)
    assert knative["apiVersion"] == "serving.knative.dev/v1" and knative["kind"] == "Service"
    # The check has teeth: a field Knative does not accept (pods get their grace from timeoutSeconds).
    broken = copy.deepcopy(knative)
    broken["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = 60
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(schema).validate(broken)


def test_knative_autoscaling_annotations(knative):
    annotations = knative["spec"]["template"]["metadata"]["annotations"]
    scaling = {k: v for k, v in annotations.items() if k.startswith("autoscaling.knative.dev/")}
    unknown = sorted(set(scaling) - set(KNATIVE_AUTOSCALING))
    assert not unknown, f"not a Knative autoscaling annotation: {unknown}"
    for key, value in scaling.items():
        assert isinstance(value, str) and KNATIVE_AUTOSCALING[key].match(value), (key, value)
    assert scaling["autoscaling.knative.dev/min-scale"] == "0"  # scale to zero
    low, high = (
        int(scaling["autoscaling.knative.dev/min-scale"]),
        int(scaling["autoscaling.knative.dev/max-scale"]),
    )
    assert high >= max(1, low)
    assert 6 <= _seconds(scaling["autoscaling.knative.dev/window"]) <= 3600  # Knative's bounds


# ---- numbers that must agree across files ---------------------------------------------------------
def test_knative_concurrency_probes_and_grace(knative):
    spec = knative["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    args = _serve_args(container)
    # containerConcurrency = the server's own limit: max_num_seqs running + max_queue waiting.
    assert args.max_queue is not None
    assert spec["containerConcurrency"] == args.max_num_seqs + args.max_queue
    target = knative["spec"]["template"]["metadata"]["annotations"]["autoscaling.knative.dev/target"]
    assert float(target) <= spec["containerConcurrency"]
    assert args.host == "0.0.0.0" and args.port == container["ports"][0]["containerPort"]
    assert _probe_path(container, "startupProbe") == "/ready"
    assert _probe_path(container, "readinessProbe") == "/ready"
    assert _probe_path(container, "livenessProbe") == "/health"
    # Knative sets the pod's terminationGracePeriodSeconds from timeoutSeconds.
    assert spec["timeoutSeconds"] >= args.shutdown_grace_seconds


def test_kubernetes_deployment_probes_and_grace(deployment):
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = _serve_args(container)
    assert args.host == "0.0.0.0"
    (port,) = container["ports"]
    assert args.port == port["containerPort"]
    assert _probe_path(container, "startupProbe") == "/ready"
    assert _probe_path(container, "readinessProbe") == "/ready"
    assert _probe_path(container, "livenessProbe") == "/health"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] in (port["name"], port["containerPort"])
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] >= float(pre_stop[1]) + args.shutdown_grace_seconds


def test_same_server_settings_everywhere(deployment, knative):
    k8s = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    kn = knative["spec"]["template"]["spec"]["containers"][0]["args"]
    assert k8s == kn
    args = _serve_args({"args": k8s})
    ray = yaml.safe_load(RAY_CONFIG.read_text())["applications"][0]
    replica = {d["name"]: d for d in ray["deployments"]}["LoraplexReplica"]
    engine = ray["args"]["engine"]
    assert engine["max_num_seqs"] == args.max_num_seqs and ray["args"]["max_queue"] == args.max_queue
    assert replica["max_ongoing_requests"] == args.max_num_seqs + args.max_queue
    assert replica["autoscaling_config"]["min_replicas"] == 0
    assert replica["autoscaling_config"]["target_ongoing_requests"] == args.max_num_seqs
    assert replica["graceful_shutdown_timeout_s"] >= args.shutdown_grace_seconds


def test_names_volumes_and_selectors_line_up(deployment, knative):
    pvc = _load(K8S / "model-cache-pvc.yaml")
    service = _load(K8S / "service.yaml")
    hpa = _load(K8S / "hpa.yaml")
    dockerfile = (ROOT / "Dockerfile").read_text()
    for pod in (deployment["spec"]["template"]["spec"], knative["spec"]["template"]["spec"]):
        (volume,) = pod["volumes"]
        assert volume["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
        (mount,) = pod["containers"][0]["volumeMounts"]
        assert mount["name"] == volume["name"] and mount["mountPath"] == "/models"
        assert _serve_args(pod["containers"][0]).adapter_dir.startswith("/models/")
    assert '"/models"' in dockerfile  # the image's model cache volume
    uid = re.search(r"--uid (\d+)", dockerfile)
    if uid:
        assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == int(uid[1])
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    assert (
        service["spec"]["ports"][0]["targetPort"]
        == deployment["spec"]["template"]["spec"]["containers"][0]["ports"][0]["name"]
    )
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] == "/metrics"
    assert (
        int(annotations["prometheus.io/port"])
        == _serve_args(deployment["spec"]["template"]["spec"]["containers"][0]).port
    )


def test_hpa_scales_on_a_metric_the_server_exports():
    hpa = _load(K8S / "hpa.yaml")
    (metric,) = hpa["spec"]["metrics"]
    name = metric["pods"]["metric"]["name"]
    assert hpa["spec"]["minReplicas"] >= 1 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    # The server's metrics module exports it as a gauge (read from the scheduler at scrape time).
    source = (ROOT / "server" / "metrics.py").read_text()
    assert re.search(rf'GaugeMetricFamily\(\s*"{name}"|_gauge\(\s*"{name}"', source), name
    # prometheus-adapter exposes it per pod under the same name.
    rules = yaml.safe_load((K8S / "prometheus-adapter-values.yaml").read_text())["rules"]["custom"]
    (rule,) = [r for r in rules if r["name"]["as"] == name]
    assert rule["seriesQuery"].startswith(name + "{")
    assert rule["resources"]["overrides"]["pod"]["resource"] == "pod"
