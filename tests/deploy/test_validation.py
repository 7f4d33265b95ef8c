"""k8s_validate against hand-written manifests of every kind `pkg deploy` renders: each valid one passes, and each
with one misspelled field, a wrong type or an unknown kind fails, naming the field. Without these, a validator that
passes everything would pass the golden-file tests too."""

from __future__ import annotations

import copy
import hashlib
import re
from typing import Any

import pytest

from k8s_validate import (
    BUILT_IN_KINDS,
    CRD_SCHEMAS,
    KINDS_WITH_SCHEMA,
    NEWEST,
    OLDEST,
    SCHEMAS,
    validate,
)

LABELS = {"app.kubernetes.io/name": "iris", "app.kubernetes.io/version": "1.0.0"}
IMAGE = "registry.example.com/iris@sha256:" + "a" * 64

VALID: dict[str, dict[str, Any]] = {
    "Deployment": {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "iris", "labels": LABELS},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app.kubernetes.io/name": "iris"}},
            "template": {
                "metadata": {"labels": LABELS},
                "spec": {
                    "terminationGracePeriodSeconds": 30,
                    "containers": [{
                        "name": "iris",
                        "image": IMAGE,
                        "imagePullPolicy": "IfNotPresent",
                        "ports": [{"name": "http", "containerPort": 3000}],
                        "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "2Gi"}},
                        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 5},
                        "livenessProbe": {"httpGet": {"path": "/livez", "port": "http"}},
                    }],
                },
            },
        },
    },
    "Service": {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "iris", "labels": LABELS},
        "spec": {
            "selector": {"app.kubernetes.io/name": "iris"},
            "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}],
        },
    },
    "PodDisruptionBudget": {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": "iris"},
        "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app.kubernetes.io/name": "iris"}}},
    },
    "HorizontalPodAutoscaler": {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "iris"},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "iris"},
            "minReplicas": 1,
            "maxReplicas": 5,
            "metrics": [{
                "type": "Resource",
                "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}},
            }],
            "behavior": {
                "scaleDown": {
                    "stabilizationWindowSeconds": 300,
                    "selectPolicy": "Max",
                    "policies": [{"type": "Pods", "value": 1, "periodSeconds": 60}],
                },
                "scaleUp": {"policies": [{"type": "Percent", "value": 100, "periodSeconds": 15}]},
            },
        },
    },
    "ServiceMonitor": {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": {"name": "iris", "labels": LABELS},
        "spec": {
            "selector": {"matchLabels": {"app.kubernetes.io/name": "iris"}},
            "endpoints": [{"port": "http", "path": "/metrics", "interval": "15s", "scheme": "http"}],
        },
    },
    "PrometheusRule": {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "iris"},
        "spec": {"groups": [{
            "name": "iris.rules",
            "rules": [{
                "alert": "IrisHighErrorRate",
                "expr": 'sum(rate(http_requests_total{service="iris",status=~"5.."}[5m])) > 1',
                "for": "10m",
                "labels": {"severity": "warning"},
                "annotations": {"summary": "iris answers 5xx"},
            }],
        }]},
    },
    "ScaledObject": {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": {"name": "iris"},
        "spec": {
            "scaleTargetRef": {"name": "iris"},
            "minReplicaCount": 1,
            "maxReplicaCount": 10,
            "pollingInterval": 15,
            "cooldownPeriod": 300,
            "triggers": [{
                "type": "prometheus",
                "metadata": {
                    "serverAddress": "http://prometheus.monitoring:9090",
                    "query": 'sum(bento_like_queue_depth{service="iris"})',
                    "threshold": "8",
                },
            }],
        },
    },
    "InferenceService/custom": {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {"name": "iris", "annotations": {"serving.kserve.io/deploymentMode": "RawDeployment"}},
        "spec": {"predictor": {
            "minReplicas": 1,
            "maxReplicas": 3,
            "containers": [{
                "name": "kserve-container",
                "image": IMAGE,
                "ports": [{"containerPort": 3000, "protocol": "TCP"}],
                "env": [{"name": "STORAGE_URI", "value": "oci://registry.example.com/iris-models:1.0.0"}],
                "resources": {"requests": {"cpu": "1", "memory": "1Gi"}},
            }],
        }},
    },
    "InferenceService/oci": {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {"name": "iris"},
        "spec": {"predictor": {"model": {
            "modelFormat": {"name": "onnx"},
            "protocolVersion": "v2",
            "storageUri": "oci://registry.example.com/iris-models:1.0.0",
        }}},
    },
}

# (example, path to a field, its misspelling): the problem must name the misspelled field at that path.
MISSPELLED = [
    ("Deployment", ["spec", "template", "spec", "containers", 0, "imagePullPolicy"], "imagePullPolice"),
    ("Deployment", ["spec"], "sepc"),
    ("Service", ["spec", "ports", 0, "targetPort"], "targetPrt"),
    ("PodDisruptionBudget", ["spec", "minAvailable"], "minAvailble"),
    ("HorizontalPodAutoscaler", ["spec", "behavior", "scaleDown", "stabilizationWindowSeconds"],
     "stabilisationWindowSeconds"),
    ("ServiceMonitor", ["spec", "endpoints", 0, "interval"], "intervall"),
    ("ServiceMonitor", ["metadata", "labels"], "lables"),
    ("PrometheusRule", ["spec", "groups", 0, "rules", 0, "annotations"], "anotations"),
    ("ScaledObject", ["spec", "pollingInterval"], "pollingIntervall"),
    ("ScaledObject", ["spec"], "sepc"),
    ("InferenceService/custom", ["spec", "predictor", "minReplicas"], "minReplica"),
    ("InferenceService/custom", ["spec", "predictor", "containers", 0, "env"], "environment"),
    ("InferenceService/oci", ["spec", "predictor", "model", "storageUri"], "storageURI"),
]


def renamed(document: dict, path: list, new_key: str) -> dict:
    """A copy of document whose field at path is called new_key, its value unchanged."""
    document = copy.deepcopy(document)
    parent = document
    for part in path[:-1]:
        parent = parent[part]
    parent[new_key] = parent.pop(path[-1])
    return document


def changed(document: dict, path: list, value: Any) -> dict:
    document = copy.deepcopy(document)
    parent = document
    for part in path[:-1]:
        parent = parent[part]
    parent[path[-1]] = value
    return document


def dotted(path: list) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")


@pytest.mark.parametrize("example", VALID)
def test_valid_manifest_passes(example: str) -> None:
    assert validate([VALID[example]]) == []


@pytest.mark.parametrize(("example", "path", "misspelling"), MISSPELLED, ids=lambda v: v if isinstance(v, str) else "")
def test_misspelled_field_fails_naming_it(example: str, path: list, misspelling: str) -> None:
    document = VALID[example]
    problems = validate([renamed(document, path, misspelling)])
    field = dotted([*path[:-1], misspelling])
    named = [p for p in problems if p.startswith(f"{document['kind']}/iris: {field}: unknown field")]
    built_in = (document["apiVersion"], document["kind"]) in BUILT_IN_KINDS
    if built_in or path[0] == "metadata":
        # Checked by kubernetes-validate, once for each Kubernetes version.
        assert [p.rsplit(" ", 1)[1] for p in named] == [f"{OLDEST})", f"{NEWEST})"], problems
    else:
        assert len(named) == 1, problems


def test_keda_threshold_given_as_a_number_fails() -> None:
    path = ["spec", "triggers", 0, "metadata", "threshold"]
    problems = validate([changed(VALID["ScaledObject"], path, 8)])
    assert problems == [
        "ScaledObject/iris: spec.triggers[0].metadata.threshold: 8 is not of type 'string' (scaledobject_v1alpha1.json)"
    ]


def test_keda_prometheus_trigger_missing_a_required_key_fails() -> None:
    # Trigger metadata is a free string map in the CRD schema: a misspelled key passes it, KEDA refuses it later.
    path = ["spec", "triggers", 0, "metadata", "threshold"]
    problems = validate([renamed(VALID["ScaledObject"], path, "treshold")])
    assert len(problems) == 1, problems
    assert problems[0].startswith("ScaledObject/iris: spec.triggers[0].metadata.threshold: required by KEDA")


@pytest.mark.parametrize(
    ("example", "path", "value", "expected"),
    [
        ("Deployment", ["spec", "replicas"], "two", "spec.replicas: 'two' is not of type 'integer'"),
        ("Service", ["spec", "ports", 0, "port"], "80", "spec.ports[0].port: '80' is not of type 'integer'"),
        ("InferenceService/custom", ["spec", "predictor", "minReplicas"], "1",
         "spec.predictor.minReplicas: '1' is not of type 'integer'"),
        ("PrometheusRule", ["spec", "groups", 0, "rules", 0, "for"], "10 minutes",
         "spec.groups[0].rules[0].for: '10 minutes' does not match"),
        ("ServiceMonitor", ["spec", "endpoints", 0, "port"], 3000, "spec.endpoints[0].port: 3000 is not of type"),
    ],
    ids=["deployment-replicas", "service-port", "isvc-minReplicas", "rule-for", "servicemonitor-port"],
)
def test_wrong_type_fails(example: str, path: list, value: Any, expected: str) -> None:
    problems = validate([changed(VALID[example], path, value)])
    assert problems and all(expected in p for p in problems), problems


def test_unknown_kind_is_a_problem() -> None:
    widget = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "iris"}, "spec": {}}
    problems = validate([widget])
    expected = "Widget/iris: no schema for Widget (example.com/v1)"
    assert [p.split(" in Kubernetes ")[0] for p in problems] == [expected, expected]


def test_removed_api_version_of_a_built_in_kind_is_a_problem() -> None:
    hpa = changed(VALID["HorizontalPodAutoscaler"], ["apiVersion"], "autoscaling/v2beta2")
    problems = validate([hpa])
    assert problems and all("no schema for HorizontalPodAutoscaler (autoscaling/v2beta2)" in p for p in problems)


def test_field_newer_than_the_oldest_version_fails_there_only() -> None:
    # HPA scaling rules gained `tolerance` after 1.29: both versions must be checked for a manifest to be portable.
    hpa = changed(VALID["HorizontalPodAutoscaler"], ["spec", "behavior", "scaleDown", "tolerance"], "0.05")
    assert validate([hpa], versions=(NEWEST,)) == []
    assert validate([hpa]) == [
        f"HorizontalPodAutoscaler/iris: spec.behavior.scaleDown.tolerance: unknown field (k8s {OLDEST})"
    ]


def test_kustomization_is_refused_with_the_way_to_check_it() -> None:
    kustomization = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                     "resources": ["deployment.yaml"]}
    [problem] = validate([kustomization])
    assert "kubectl kustomize DIR" in problem


@pytest.mark.parametrize(
    ("example", "path", "value", "expected"),
    [
        ("Service", ["metadata", "name"], "iris_classifier", "metadata.name: 'iris_classifier' is not a DNS-1035"),
        ("InferenceService/oci", ["metadata", "name"], "1iris", "metadata.name: '1iris' is not a DNS-1035"),
        ("Deployment", ["metadata", "name"], "Iris", "metadata.name: 'Iris' is not a DNS-1123"),
        ("Deployment", ["metadata", "name"], None, "metadata.name: required"),
        ("PodDisruptionBudget", ["metadata", "labels"], {"version": "sha256:" + "a" * 64},
         "metadata.labels.version: 'sha256:"),
    ],
    ids=["service-underscore", "isvc-digit-first", "deployment-capital", "no-name", "label-value"],
)
def test_names_and_labels_the_api_server_refuses(example: str, path: list, value: Any, expected: str) -> None:
    problems = validate([changed(VALID[example], path, value)])
    assert any(expected in p for p in problems), problems


def test_every_document_is_reported_and_empty_ones_skipped() -> None:
    bad = changed(VALID["Service"], ["spec", "ports", 0, "port"], "80")
    problems = validate([VALID["Deployment"], None, bad, {"kind": "Service"}])
    assert len(problems) == 3, problems
    assert problems[-1].startswith("Service/?: apiVersion and kind must both be strings")


def test_every_kind_with_a_schema_has_a_valid_example_here() -> None:
    covered = {(doc["apiVersion"], doc["kind"]) for doc in VALID.values()}
    assert covered == KINDS_WITH_SCHEMA
    assert NEWEST != OLDEST


def test_stored_schemas_are_the_catalogs_files_unchanged() -> None:
    # schemas/README.md names each file with the git blob id it has in datreeio/CRDs-catalog.
    readme = (SCHEMAS / "README.md").read_text()
    for schema_file in CRD_SCHEMAS.values():
        data = (SCHEMAS / schema_file).read_bytes()
        blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        row = next(line for line in readme.splitlines() if line.startswith(f"| `{schema_file}`"))
        assert re.search(rf"`{blob}`", row), f"{schema_file} differs from the catalog's blob named in README.md"
