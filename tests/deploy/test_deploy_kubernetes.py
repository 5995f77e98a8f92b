"""Render the kustomize base and example overlay and check what they produce."""

from __future__ import annotations

import base64
import copy
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML is not installed")
kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate is not installed"
)
jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is not installed")

REPO = Path(__file__).resolve().parents[2]
KUSTOMIZE_DIRS = {
    "base": REPO / "deploy" / "kubernetes" / "base",
    "overlay": REPO / "deploy" / "kubernetes" / "overlays" / "example",
}
NAME_LABEL = "app.kubernetes.io/name"
APP = "batch-reconciler"
SECRET = "batch-reconciler-urls"
# Oldest and newest Kubernetes versions the manifests are validated against.
K8S_VERSIONS = ("1.29", "latest")
# Custom resources: no schema in kubernetes-validate; checked by their own tests below.
CRD_KINDS = {"ServiceMonitor"}
# The non-secret settings of the public contract (URLs and token come from the Secret).
CONTRACT_SETTINGS = {
    "RECONCILER_NAMESPACE": "reconciler",
    "RECONCILER_HTTP_HOST": "0.0.0.0",
    "RECONCILER_HTTP_PORT": "8080",
    "RECONCILER_HANDLER": "reconciler.handlers:inspect_file",
    "RECONCILER_CONCURRENCY": "16",
    "RECONCILER_SWEEP_INTERVAL_S": "30",
    "RECONCILER_STUCK_GRACE_S": "10",
    "RECONCILER_VISIBILITY_TIMEOUT_S": "60",
    "RECONCILER_MAX_ATTEMPTS": "3",
    "RECONCILER_LOG_FORMAT": "json",
    "RECONCILER_DATABASE_POOLER": "none",
    "RECONCILER_RETENTION_DAYS": "30",
}
SECRET_ENV = {
    "RECONCILER_DATABASE_URL": "database-url",
    "RECONCILER_REDIS_URL": "redis-url",
    "RECONCILER_API_TOKEN": "api-token",
}
DRAIN_DEADLINE_S = 25

Obj = dict[str, Any]


def _kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.skip("kubectl is not installed (needed for `kubectl kustomize`)")
    return path


def render(target: str) -> list[Obj]:
    """Run `kubectl kustomize` on a directory and return the rendered objects."""
    result = subprocess.run(
        [_kubectl(), "kustomize", str(KUSTOMIZE_DIRS[target])],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, (
        f"kubectl kustomize {target} failed (the kustomizations use only local files, "
        f"so this is not a network problem):\n{result.stderr}"
    )
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def base() -> list[Obj]:
    return render("base")


@pytest.fixture(scope="module")
def overlay() -> list[Obj]:
    return render("overlay")


@pytest.fixture(scope="module", params=sorted(KUSTOMIZE_DIRS))
def rendered(request: pytest.FixtureRequest) -> list[Obj]:
    return render(str(request.param))


def one(objects: list[Obj], kind: str) -> Obj:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def pod_spec(objects: list[Obj]) -> Obj:
    spec: Obj = one(objects, "Deployment")["spec"]["template"]["spec"]
    return spec


def all_containers(objects: list[Obj]) -> Iterator[Obj]:
    spec = pod_spec(objects)
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


def main_container(objects: list[Obj]) -> Obj:
    containers = pod_spec(objects)["containers"]
    assert len(containers) == 1
    container: Obj = containers[0]
    return container


def test_base_renders_the_expected_objects(base: list[Obj]) -> None:
    """The base renders exactly the documented set of objects and no Secret."""
    kinds = sorted(o["kind"] for o in base)
    assert kinds == sorted(
        [
            "ConfigMap",
            "Deployment",
            "NetworkPolicy",
            "PodDisruptionBudget",
            "Service",
            "ServiceAccount",
            "ServiceMonitor",
        ]
    )


def test_overlay_renders_base_plus_namespace_and_secret(overlay: list[Obj]) -> None:
    """The example overlay adds a Namespace and a generated Secret to the base's objects."""
    kinds = sorted(o["kind"] for o in overlay)
    assert kinds.count("Namespace") == 1
    assert kinds.count("Secret") == 1
    assert kinds.count("Deployment") == 1


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_rendered_objects_validate_against_kubernetes_schemas(
    rendered: list[Obj], version: str
) -> None:
    """Every built-in object passes strict OpenAPI schema validation (unknown fields fail)."""
    k8s_version = kubernetes_validate.latest_version() if version == "latest" else version
    checked = 0
    for obj in rendered:
        if obj["kind"] in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(obj, k8s_version, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(p) for p in error.path)
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {path}: {error.message}")
        checked += 1
    assert checked == len(rendered) - sum(o["kind"] in CRD_KINDS for o in rendered)


def test_strict_validation_rejects_a_misspelled_field(base: list[Obj]) -> None:
    """The schema check is not a no-op: a typo in the Deployment is reported."""
    broken = copy.deepcopy(one(base, "Deployment"))
    broken["spec"]["template"]["spec"]["terminationGracePeriodSecond"] = 40
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, "1.29", strict=True)


# The part of the Prometheus Operator's ServiceMonitor schema the base relies on.
SERVICEMONITOR_SCHEMA: Obj = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "properties": {
                "selector": {
                    "type": "object",
                    "properties": {
                        "matchLabels": {
                            "type": "object",
                            "additionalProperties": {"type": "string"},
                        }
                    },
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                            "scrapeTimeout": {
                                "type": "string",
                                "pattern": "^[0-9]+(ms|s|m|h)$",
                            },
                            "scheme": {"enum": ["http", "https"]},
                        },
                    },
                },
            },
        },
    },
}


def test_servicemonitor_scrapes_the_service_http_port(rendered: list[Obj]) -> None:
    """The ServiceMonitor (a CRD) selects the Service and scrapes port http, /metrics, 15s."""
    monitor = one(rendered, "ServiceMonitor")
    jsonschema.validate(monitor, SERVICEMONITOR_SCHEMA)
    service = one(rendered, "Service")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    assert endpoint["interval"] == "15s"


def test_deployment_pods_are_locked_down(rendered: list[Obj]) -> None:
    """Pod and every container run as uid 10001, non-root, read-only, no escalation."""
    spec = pod_spec(rendered)
    pod_sc = spec["securityContext"]
    assert pod_sc["runAsNonRoot"] is True
    assert pod_sc["runAsUser"] == 10001
    assert pod_sc["seccompProfile"]["type"] == "RuntimeDefault"
    assert spec["automountServiceAccountToken"] is False
    for container in all_containers(rendered):
        sc = container["securityContext"]
        name = container["name"]
        assert sc["runAsNonRoot"] is True, name
        assert sc["runAsUser"] == 10001, name
        assert sc["readOnlyRootFilesystem"] is True, name
        assert sc["allowPrivilegeEscalation"] is False, name
        assert sc["capabilities"]["drop"] == ["ALL"], name
        assert "add" not in sc["capabilities"], name
        assert sc["seccompProfile"]["type"] == "RuntimeDefault", name


def test_grace_period_outlasts_prestop_and_drain(rendered: list[Obj]) -> None:
    """terminationGracePeriodSeconds covers the preStop delay plus the 25 s drain deadline."""
    spec = pod_spec(rendered)
    grace = spec["terminationGracePeriodSeconds"]
    assert grace == 40
    prestop = main_container(rendered)["lifecycle"]["preStop"]["exec"]["command"]
    assert prestop[0] == "sleep"
    assert grace > int(prestop[1]) + DRAIN_DEADLINE_S


def test_tmp_is_a_writable_emptydir_in_every_container(rendered: list[Obj]) -> None:
    """With a read-only root filesystem, /tmp is an emptyDir mounted in every container."""
    volumes = {v["name"]: v for v in pod_spec(rendered)["volumes"]}
    for container in all_containers(rendered):
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert "/tmp" in mounts, container["name"]
        assert "emptyDir" in volumes[mounts["/tmp"]]


def test_probes_use_healthz_and_readyz_on_named_http_port(rendered: list[Obj]) -> None:
    """Liveness hits /healthz and readiness /readyz on port http (containerPort 8080)."""
    container = main_container(rendered)
    assert {"name": "http", "containerPort": 8080, "protocol": "TCP"} in container["ports"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert container["args"] == ["run", "--role", "all"]


def test_every_container_has_resource_requests_and_limits(rendered: list[Obj]) -> None:
    """Every container, init included, sets CPU and memory requests and limits."""
    for container in all_containers(rendered):
        resources = container["resources"]
        for section in ("requests", "limits"):
            assert {"cpu", "memory"} <= resources[section].keys(), container["name"]


def test_init_container_runs_migrate_with_the_database_url(rendered: list[Obj]) -> None:
    """An init container runs `reconciler migrate` with the same image and database URL."""
    [init] = pod_spec(rendered)["initContainers"]
    assert init["args"] == ["migrate"]
    assert init["image"] == main_container(rendered)["image"]
    env = {e["name"]: e for e in init["env"]}
    assert "RECONCILER_DATABASE_URL" in env


def test_base_has_two_replicas_and_a_pdb_of_min_available_one(base: list[Obj]) -> None:
    """The base runs 2 replicas, and the PodDisruptionBudget keeps at least 1."""
    assert one(base, "Deployment")["spec"]["replicas"] == 2
    pdb = one(base, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1


def test_urls_come_from_the_secret_and_are_not_shipped_in_base(base: list[Obj]) -> None:
    """URLs and token are secretKeyRefs to batch-reconciler-urls; api-token is optional."""
    assert not [o for o in base if o["kind"] == "Secret"]
    for container in all_containers(base):
        refs = {
            e["name"]: e["valueFrom"]["secretKeyRef"]
            for e in container.get("env", [])
            if "secretKeyRef" in e.get("valueFrom", {})
        }
        assert {"RECONCILER_DATABASE_URL", "RECONCILER_REDIS_URL"} <= refs.keys()
        for env_name, ref in refs.items():
            assert ref["name"] == SECRET
            assert ref["key"] == SECRET_ENV[env_name]
            assert ref.get("optional", False) is (env_name == "RECONCILER_API_TOKEN")
    assert "RECONCILER_API_TOKEN" in {e["name"] for e in main_container(base)["env"]}


def test_configmap_holds_the_contract_settings_and_no_urls(base: list[Obj]) -> None:
    """The ConfigMap has every non-secret RECONCILER_* setting at its contract default."""
    configmap = one(base, "ConfigMap")
    assert configmap["data"] == CONTRACT_SETTINGS
    name = configmap["metadata"]["name"]
    for container in all_containers(base):
        assert {"configMapRef": {"name": name}} in container["envFrom"]


def test_selectors_match_the_pod_labels(rendered: list[Obj]) -> None:
    """Every object carries the name label, and every selector selects the pods."""
    pod_labels = one(rendered, "Deployment")["spec"]["template"]["metadata"]["labels"]
    for obj in rendered:
        assert obj["metadata"]["labels"][NAME_LABEL] == APP, obj["kind"]
    selectors = [
        one(rendered, "Deployment")["spec"]["selector"]["matchLabels"],
        one(rendered, "Service")["spec"]["selector"],
        one(rendered, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
        one(rendered, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"],
    ]
    for selector in selectors:
        assert selector and selector.items() <= pod_labels.items()


def test_service_exposes_port_8080_named_http(rendered: list[Obj]) -> None:
    """The Service maps port 8080 named http to the container's http port."""
    [port] = one(rendered, "Service")["spec"]["ports"]
    assert port == {"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP"}


def test_networkpolicy_allows_only_http_in_and_postgres_redis_dns_out(
    rendered: list[Obj],
) -> None:
    """Ingress only on TCP 8080; egress only to 5432, 6379 and DNS 53 (UDP and TCP)."""
    spec = one(rendered, "NetworkPolicy")["spec"]
    assert sorted(spec["policyTypes"]) == ["Egress", "Ingress"]
    ingress = {(p["protocol"], p["port"]) for rule in spec["ingress"] for p in rule["ports"]}
    assert ingress == {("TCP", 8080)}
    egress = {(p["protocol"], p["port"]) for rule in spec["egress"] for p in rule["ports"]}
    assert egress == {("TCP", 5432), ("TCP", 6379), ("UDP", 53), ("TCP", 53)}


def test_overlay_sets_namespace_image_and_patches_settings(overlay: list[Obj]) -> None:
    """The overlay namespaces every object, pins the image and patches only chosen settings."""
    namespace = one(overlay, "Namespace")["metadata"]["name"]
    for obj in overlay:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == namespace, obj["kind"]
    for container in all_containers(overlay):
        image = container["image"]
        assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), image
    data = one(overlay, "ConfigMap")["data"]
    assert data.keys() == CONTRACT_SETTINGS.keys()
    changed = {k for k, v in data.items() if CONTRACT_SETTINGS[k] != v}
    assert changed, "the example patch changes at least one setting"
    assert "RECONCILER_HTTP_PORT" not in changed


def test_overlay_secret_has_placeholder_urls_and_is_referenced(overlay: list[Obj]) -> None:
    """The example Secret holds clearly fake URLs, and the pods reference the generated names."""
    secret = one(overlay, "Secret")
    assert secret["metadata"]["name"].startswith(SECRET)
    literals = secret.get("data", {})
    assert {"database-url", "redis-url"} <= literals.keys()
    for key in ("database-url", "redis-url"):
        value = base64.b64decode(literals[key]).decode()
        assert ".example.invalid" in value, value
    configmap = one(overlay, "ConfigMap")["metadata"]["name"]
    for container in all_containers(overlay):
        for env in container.get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["name"] == secret["metadata"]["name"]
        assert {"configMapRef": {"name": configmap}} in container["envFrom"]
