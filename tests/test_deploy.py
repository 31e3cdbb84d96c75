"""The deployment files, checked offline: no Docker engine and no cluster run here.

- Kubernetes: each overlay is built with `kubectl kustomize` (skipped where kubectl is absent);
  every core object is validated against the Kubernetes API schema (`kubernetes-validate`, strict)
  and every KEDA / Prometheus-operator object against its CRD's schema (vendored in
  tests/schemas/); then the pieces must fit: each worker serves a model of its overlay's registry,
  KEDA watches that model's queue and scales that worker, selectors do not overlap, and each
  worker of a compiled-backend model first builds its engine (an init container) into the cache
  volume it reads, also with the shared-engine-cache component added.
- docker-compose.yml: validated against the compose specification's JSON schema; its build
  targets exist in the Dockerfile; Prometheus scrapes services that exist.
- The metrics that the dashboards and alerts use are ones the code exports.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from hypersd.registry import DEFAULT_REGISTRY_PATH, load_registry
from jobs.queue import queue_name

REPO = Path(__file__).resolve().parent.parent
KUBERNETES = REPO / "deploy" / "kubernetes"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
KUBERNETES_VERSION = "1.32.0"
# Each overlay's registry: what its workers load and its gateway checks requests against.
OVERLAYS = {
    "cpu-shapes": DEFAULT_REGISTRY_PATH,
    "gpu-sdxl": KUBERNETES / "overlays" / "gpu-sdxl" / "registry.toml",
}
CRD_FILES = {
    "ScaledObject": SCHEMAS / "keda" / "keda.sh_scaledobjects.yaml",
    "ServiceMonitor": SCHEMAS
    / "prometheus-operator"
    / "monitoring.coreos.com_servicemonitors.yaml",
    "PrometheusRule": SCHEMAS
    / "prometheus-operator"
    / "monitoring.coreos.com_prometheusrules.yaml",
}


def crd_schema(kind: str, api_version: str) -> dict[str, Any]:
    """The openAPIV3Schema of `kind` at `api_version` from its vendored CRD."""
    crd = yaml.safe_load(CRD_FILES[kind].read_text())
    group, version = api_version.split("/")
    assert crd["spec"]["group"] == group
    for served in crd["spec"]["versions"]:
        if served["name"] == version:
            schema: dict[str, Any] = served["schema"]["openAPIV3Schema"]
            return schema
    raise AssertionError(f"{kind} {api_version} is not in its CRD")


def validate_crd_object(obj: dict[str, Any]) -> None:
    """Validate a custom resource against its CRD's schema (OpenAPI v3, close to draft 7).

    The schema itself is not checked: the CRDs carry Go regular expressions (`^(?i)...`) that
    Python's `re` refuses, in fields these objects do not use.
    """
    jsonschema.Draft7Validator(crd_schema(obj["kind"], obj["apiVersion"])).validate(obj)


def kustomize(folder: Path) -> list[dict[str, Any]]:
    """The objects `kubectl kustomize` builds from the kustomization in `folder`."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with kustomize) is not installed")
    built = subprocess.run(
        [kubectl, "kustomize", str(folder)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return [doc for doc in yaml.safe_load_all(built.stdout) if doc]


@functools.cache
def build_overlay(name: str) -> list[dict[str, Any]]:
    """The objects `kubectl kustomize` builds from an overlay."""
    return kustomize(KUBERNETES / "overlays" / name)


@pytest.fixture(params=sorted(OVERLAYS))
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    """An overlay's name and its built objects."""
    return request.param, build_overlay(request.param)


def of_kind(objects: list[dict[str, Any]], kind: str) -> Iterator[dict[str, Any]]:
    return (obj for obj in objects if obj["kind"] == kind)


def test_every_object_is_valid_against_its_schema(
    overlay: tuple[str, list[dict[str, Any]]],
) -> None:
    _, objects = overlay
    kinds = {obj["kind"] for obj in objects}
    assert {"Deployment", "StatefulSet", "HorizontalPodAutoscaler", "ScaledObject"} <= kinds
    assert {"PodDisruptionBudget", "ServiceMonitor", "PrometheusRule", "ConfigMap"} <= kinds
    for obj in objects:
        if obj["kind"] in CRD_FILES:
            validate_crd_object(obj)
        else:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_a_wrong_field_is_caught() -> None:
    """The validation above can fail: a misspelt field in each kind of schema is refused."""
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "x"},
        "spec": {"ports": [{"port": 80, "targetPortt": 8000}]},
    }
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(service, KUBERNETES_VERSION, strict=True)
    scaled = {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": {"name": "x"},
        "spec": {"scaleTargetRef": {"name": "x"}, "minReplicaCount": "zero", "triggers": []},
    }
    with pytest.raises(jsonschema.ValidationError):
        validate_crd_object(scaled)


def test_workers_serve_their_overlays_models_and_keda_watches_their_queues(
    overlay: tuple[str, list[dict[str, Any]]],
) -> None:
    name, objects = overlay
    registry = load_registry(OVERLAYS[name])
    namespaces = {obj["metadata"].get("namespace") for obj in objects} - {None}
    assert namespaces == {"hypersd"}
    config = next(
        obj
        for obj in of_kind(objects, "ConfigMap")
        if obj["metadata"]["name"].startswith("hypersd-config")
    )
    served = json.loads(config["data"]["HYPERSD_SERVED_MODELS"])
    workers = {
        obj["metadata"]["name"]: obj
        for obj in of_kind(objects, "Deployment")
        if obj["metadata"]["labels"].get("app.kubernetes.io/component") == "worker"
    }
    models = {}
    for deployment_name, deployment in workers.items():
        args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        assert args[:2] == ["worker", "--model"], args
        models[deployment_name] = args[2]
        assert args[2] in registry.names
        assert deployment["spec"]["selector"]["matchLabels"]["hypersd.dev/model"] == args[2]
    assert sorted(models.values()) == sorted(served), "a worker for each served model"
    scaled = list(of_kind(objects, "ScaledObject"))
    assert len(scaled) == len(workers)
    for obj in scaled:
        target = obj["spec"]["scaleTargetRef"]["name"]
        trigger = obj["spec"]["triggers"][0]
        assert target in workers, f"{obj['metadata']['name']} scales no Deployment"
        assert trigger["type"] == "redis"
        assert trigger["metadata"]["listName"] == queue_name(models[target])
        # KEDA's operator resolves the address from its own namespace: fully qualified.
        assert trigger["metadata"]["address"].startswith("redis.hypersd.svc.")
        assert obj["spec"]["minReplicaCount"] == 0  # scale from zero
    selectors = [
        tuple(sorted(obj["spec"]["selector"]["matchLabels"].items()))
        for obj in objects
        if obj["kind"] in ("Deployment", "StatefulSet")
    ]
    assert len(selectors) == len(set(selectors)), "two workloads share a selector"


def worker_deployments(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        obj
        for obj in of_kind(objects, "Deployment")
        if obj["metadata"]["labels"].get("app.kubernetes.io/component") == "worker"
    ]


def env_values(container: dict[str, Any]) -> dict[str, str]:
    return {var["name"]: var["value"] for var in container.get("env", []) if "value" in var}


def volume_at(container: dict[str, Any], path: str) -> dict[str, Any]:
    """The volume mount of `container` at `path` (the whole volume, no subPath)."""
    (mount,) = [mount for mount in container["volumeMounts"] if mount["mountPath"] == path]
    assert "subPath" not in mount and not mount.get("readOnly", False), mount
    return mount


def engine_cache_volume(deployment: dict[str, Any]) -> dict[str, Any]:
    """Check that the worker's init container builds the worker's model into the cache the
    worker loads from (same image, config, cache path and volume); return that volume."""
    pod = deployment["spec"]["template"]["spec"]
    worker = pod["containers"][0]
    (init,) = pod["initContainers"]
    assert init["args"] == ["build-engine", "--model", worker["args"][2]], init["args"]
    assert init["image"] == worker["image"]
    assert init["envFrom"] == worker["envFrom"]  # the same registry and settings
    cache = env_values(init)["HYPERSD_ENGINE_CACHE"]
    assert env_values(worker)["HYPERSD_ENGINE_CACHE"] == cache
    name = volume_at(init, cache)["name"]
    assert volume_at(worker, cache)["name"] == name
    (volume,) = [volume for volume in pod["volumes"] if volume["name"] == name]
    return volume


def test_workers_of_compiled_models_build_their_engine_first_into_the_cache_they_read(
    overlay: tuple[str, list[dict[str, Any]]],
) -> None:
    name, objects = overlay
    registry = load_registry(OVERLAYS[name])
    building = set()
    for deployment in worker_deployments(objects):
        pod = deployment["spec"]["template"]["spec"]
        model = pod["containers"][0]["args"][2]
        if registry.get(model).backend == "eager":
            # `build-engine` refuses an eager model: the pod would never start.
            assert "initContainers" not in pod, deployment["metadata"]["name"]
            continue
        building.add(model)
        # Each pod's own cache unless the shared-engine-cache component is added (below).
        assert engine_cache_volume(deployment) == {"name": "engine-cache", "emptyDir": {}}
    if name == "cpu-shapes":  # both shipped Shapes models run on ONNX Runtime
        assert building == {"shapes-hyper-4step", "shapes-base"}


def test_the_shared_engine_cache_component_gives_every_worker_one_claim(tmp_path: Path) -> None:
    """The overlay with the component, as deploy/README.md says to add it."""
    root = Path(os.path.relpath(KUBERNETES, tmp_path))  # kustomize refuses absolute paths
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": "hypersd",
        "resources": [str(root / "overlays" / "cpu-shapes")],
        "components": [str(root / "components" / "shared-engine-cache")],
    }
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    objects = kustomize(tmp_path)
    for obj in objects:
        if obj["kind"] not in CRD_FILES:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    (claim,) = of_kind(objects, "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # workers on several nodes
    workers = worker_deployments(objects)
    assert len(workers) == 2
    for deployment in workers:
        volume = engine_cache_volume(deployment)
        assert volume == {
            "name": "engine-cache",
            "persistentVolumeClaim": {"claimName": claim["metadata"]["name"]},
        }


def test_the_gateway_reads_its_api_keys_from_the_secret(
    overlay: tuple[str, list[dict[str, Any]]],
) -> None:
    _, objects = overlay
    gateway = next(
        obj for obj in of_kind(objects, "Deployment") if obj["metadata"]["name"] == "gateway"
    )
    sources = gateway["spec"]["template"]["spec"]["containers"][0]["envFrom"]
    assert {"secretRef": {"name": "hypersd-api-keys"}} in sources
    # the Secret is the operator's (deploy/README.md), never a committed placeholder
    assert not [obj for obj in objects if obj["kind"] == "Secret"]


def test_the_gpu_overlay_gives_each_worker_a_gpu_and_the_registry() -> None:
    objects = build_overlay("gpu-sdxl")
    for deployment in of_kind(objects, "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        mounts = {mount["mountPath"] for mount in pod["containers"][0].get("volumeMounts", [])}
        assert "/etc/hypersd" in mounts  # the registry ConfigMap, gateway and workers alike
        if deployment["metadata"]["labels"].get("app.kubernetes.io/component") == "worker":
            assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
            assert pod["containers"][0]["image"].startswith("hypersd-worker-cuda")


def exported_metrics() -> set[str]:
    """Metric names the gateway and the workers export (read from their source)."""
    names = set()
    for path in (REPO / "service" / "metrics.py", REPO / "worker" / "metrics.py"):
        names |= set(re.findall(r'"(hypersd_[a-z_]+)"', path.read_text()))
    return names


def used_metrics(expression: str) -> set[str]:
    """hypersd_* series in a PromQL expression, without the suffixes Prometheus adds."""
    series = set(re.findall(r"\bhypersd_[a-z_]+", expression))
    return {re.sub(r"_(bucket|sum|count|total)$", "", name) for name in series}


def test_dashboards_and_alerts_use_metrics_the_code_exports() -> None:
    exported = exported_metrics()
    assert "hypersd_queue_depth" in exported and "hypersd_worker_run_seconds" in exported
    monitoring = yaml.safe_load_all((KUBERNETES / "base" / "monitoring.yaml").read_text())
    rules = next(doc for doc in monitoring if doc["kind"] == "PrometheusRule")
    expressions = [rule["expr"] for group in rules["spec"]["groups"] for rule in group["rules"]]
    dashboard = json.loads((REPO / "deploy/compose/grafana/dashboards/hypersd.json").read_text())
    expressions += [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    for expression in expressions:
        missing = used_metrics(expression) - exported
        assert not missing, f"{missing} in {expression!r} are not exported"


def test_compose_file_is_valid_and_fits_the_dockerfile() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    schema = json.loads((SCHEMAS / "compose-spec" / "compose-spec.json").read_text())
    validator = jsonschema.Draft7Validator(schema)  # its `$schema` URL lacks the trailing '#'
    validator.validate(compose)
    with pytest.raises(jsonschema.ValidationError):  # and a misspelt key would be caught
        validator.validate({"services": {"x": {"imagee": "redis"}}})
    targets = set(re.findall(r"^FROM \S+ AS (\S+)$", (REPO / "Dockerfile").read_text(), re.M))
    assert {"gateway", "worker-cpu", "worker-cuda"} <= targets
    services = compose["services"]
    for service in services.values():
        build = service.get("build")
        if build is not None:
            assert build["target"] in targets
    # Every worker serves a model its gateway's registry has; Prometheus scrapes real services.
    shipped = load_registry(DEFAULT_REGISTRY_PATH)
    gateway_models = json.loads(services["gateway"]["environment"]["HYPERSD_SERVED_MODELS"])
    cpu_workers = [s for s in services.values() if s.get("image") == "hypersd-worker-cpu"]
    assert sorted(s["command"][2] for s in cpu_workers) == sorted(gateway_models)
    assert set(gateway_models) <= set(shipped.names)
    # The CPU workers share one named volume as their engine cache.
    for service in cpu_workers:
        cache = service["environment"]["HYPERSD_ENGINE_CACHE"]
        assert f"engine-cache:{cache}" in service["volumes"]
    assert "engine-cache" in compose["volumes"]
    prometheus = yaml.safe_load((REPO / "deploy/compose/prometheus.yml").read_text())
    for job in prometheus["scrape_configs"]:
        for target in job["static_configs"][0]["targets"]:
            assert target.split(":")[0] in services, target
