"""The cluster objects of one bento, as plain dicts: a Deployment and its Service, disruption budget and
autoscaler, or a KServe InferenceService; monitoring objects beside them.

What each field is set to, and why, is in docs/deploy.md; the values come from a ``Plan`` (render.py), which
derived them from the bento's manifest and the ``deploy:`` section.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .config import DeployConfig

CONTAINER = "bento"
NAME_LABEL = "app.kubernetes.io/name"
ANNOTATION_PREFIX = "bento-like.dev"
TMP = "/tmp"  # the image's HOME and BENTO_LIKE_HOME live under it: the one place the server writes
UID = 10001  # the image's user (builders/oci.py DEFAULT_USER)
PROBE_PERIOD_S = 5
STARTUP_PERIOD_S = 5
HOOK_TIMEOUT_S = 5  # serving's limit on a service's own readiness check, which /readyz waits for


@dataclass(frozen=True)
class Plan:
    """Everything the objects are made from, decided once."""

    name: str
    config: DeployConfig
    image: str
    bento: str  # name:version
    service: str
    apis: tuple[str, ...]
    timeout_s: float
    cpu: float | None
    memory: str | None
    gpu: int
    gpu_type: str | None
    startup_budget_s: int
    graceful_s: float
    target_load: float
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def selector(self) -> dict[str, str]:
        return {NAME_LABEL: self.name}


def deployment(plan: Plan) -> dict[str, Any]:
    cfg = plan.config
    spec: dict[str, Any] = {
        "revisionHistoryLimit": 5,
        "selector": {"matchLabels": plan.selector},
        # a new pod must be ready before an old one goes: capacity never drops during a rollout
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
        # a rollout that cannot get a pod ready within its startup budget (plus scheduling) is reported stuck
        "progressDeadlineSeconds": max(600, plan.startup_budget_s + 300),
        "template": {"metadata": pod_metadata(plan), "spec": pod_spec(plan)},
    }
    if cfg.autoscale == "none":
        spec = {"replicas": cfg.replicas, **spec}  # under an autoscaler, a re-apply must not reset its count
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(plan),
        "spec": spec,
    }


def _metadata(plan: Plan, name: str | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name or plan.name, "labels": dict(plan.labels)}
    if plan.config.annotations:
        meta["annotations"] = dict(sorted(plan.config.annotations.items()))
    return meta


def pod_metadata(plan: Plan) -> dict[str, Any]:
    annotations = {f"{ANNOTATION_PREFIX}/service": plan.service}
    if plan.config.monitoring == "annotations":
        annotations.update({"prometheus.io/scrape": "true", "prometheus.io/port": str(plan.config.port),
                            "prometheus.io/path": "/metrics"})
    return {"labels": dict(plan.labels), "annotations": dict(sorted(annotations.items()))}


def pod_spec(plan: Plan) -> dict[str, Any]:
    cfg = plan.config
    volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {}}]
    mounts = [{"name": "tmp", "mountPath": TMP}]
    if plan.gpu:
        # CUDA and torch share tensors between processes through /dev/shm, which is 64 MB in a container
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    spec: dict[str, Any] = {
        # drain, then the graceful timeout for in-flight requests, then a margin for the @on_shutdown hooks
        "terminationGracePeriodSeconds": math.ceil(cfg.drain_s + plan.graceful_s) + 10,
        "automountServiceAccountToken": False,  # the server never talks to the API server
        "enableServiceLinks": False,  # no FOO_SERVICE_HOST variables for every Service in the namespace
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": UID,
            "runAsGroup": UID,
            "fsGroup": UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container(plan, mounts)],
        "volumes": volumes,
    }
    if cfg.service_account:
        spec["serviceAccountName"] = cfg.service_account
    if cfg.image_pull_secrets:
        spec["imagePullSecrets"] = [{"name": s} for s in cfg.image_pull_secrets]
    selector = dict(cfg.node_selector)
    if plan.gpu_type:
        selector.setdefault(cfg.gpu_node_label, plan.gpu_type)
    if selector:
        spec["nodeSelector"] = dict(sorted(selector.items()))
    tolerations = list(cfg.tolerations)
    if plan.gpu:  # GPU nodes are usually tainted so that nothing else lands on them
        tolerations.append({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"})
    if tolerations:
        spec["tolerations"] = tolerations
    return spec


def container(plan: Plan, mounts: list[dict[str, Any]], name: str = CONTAINER,
              port_name: str = "http") -> dict[str, Any]:
    cfg = plan.config
    env = {"BENTO_LIKE_PORT": str(cfg.port), **cfg.env}
    c: dict[str, Any] = {
        "name": name,
        "image": plan.image,
        "imagePullPolicy": "IfNotPresent",
        # after the image's entrypoint (`python3 -m bento_like serve <bento> --host 0.0.0.0`)
        "args": ["--port", str(cfg.port), "--drain-delay", _seconds(cfg.drain_s),
                 "--graceful-timeout", _seconds(plan.graceful_s)],
        "env": [{"name": k, "value": v} for k, v in sorted(env.items())],
        "ports": [{"name": port_name, "containerPort": cfg.port, "protocol": "TCP"}],
        "resources": resources(plan),
        "startupProbe": _probe(plan, "/readyz", port_name, period=STARTUP_PERIOD_S,
                               failures=math.ceil(plan.startup_budget_s / STARTUP_PERIOD_S)),
        "readinessProbe": _probe(plan, "/readyz", port_name, period=PROBE_PERIOD_S, failures=2),
        # a live process answers /livez even when busy or degraded: only a dead or wedged one is restarted
        "livenessProbe": _probe(plan, "/livez", port_name, period=10, failures=3),
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": mounts,
    }
    return c


def _probe(plan: Plan, path: str, port_name: str, *, period: int, failures: int) -> dict[str, Any]:
    timeout = HOOK_TIMEOUT_S + 1  # /readyz may wait for the service's own readiness check
    if plan.config.probe == "exec":
        handler: dict[str, Any] = {"exec": {"command": [
            "python3", "-m", "bento_like", "probe", f"http://127.0.0.1:{plan.config.port}{path}",
            "--timeout", str(timeout)]}}
    else:
        handler = {"httpGet": {"path": path, "port": port_name}}
    return {**handler, "periodSeconds": period, "timeoutSeconds": timeout, "failureThreshold": failures}


def resources(plan: Plan) -> dict[str, Any]:
    requests: dict[str, Any] = {}
    limits: dict[str, Any] = {}
    if plan.cpu is not None:
        requests["cpu"] = _cpu(plan.cpu)  # no CPU limit: throttling would add latency to every request
    if plan.memory is not None:
        requests["memory"] = limits["memory"] = plan.memory  # the same: never killed for using what it asked
    if plan.gpu:
        limits["nvidia.com/gpu"] = plan.gpu
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def service(plan: Plan) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(plan),
        "spec": {
            "type": "ClusterIP",
            "selector": plan.selector,
            "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP", "appProtocol": "http"}],
        },
    }


def disruption_budget(plan: Plan, selector: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(plan),
        "spec": {
            # one at a time: a node drain never takes two replicas, and a single replica can still be moved
            "maxUnavailable": 1,
            "selector": {"matchLabels": selector or plan.selector},
            # a pod that is not ready serves nobody: evicting it must not wait on the budget
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }


def scaling_behavior(plan: Plan) -> dict[str, Any]:
    """Up at once (a queue of requests is already late), down slowly (a replica takes its startup to return)."""
    return {
        "scaleUp": {
            "stabilizationWindowSeconds": 0,
            "selectPolicy": "Max",
            "policies": [{"type": "Percent", "value": 100, "periodSeconds": 15},
                         {"type": "Pods", "value": 4, "periodSeconds": 15}],
        },
        "scaleDown": {
            "stabilizationWindowSeconds": plan.config.scale_down_window_s,
            "selectPolicy": "Min",
            "policies": [{"type": "Pods", "value": 1, "periodSeconds": 60}],
        },
    }


def horizontal_autoscaler(plan: Plan, target: str, metric: str) -> dict[str, Any]:
    cfg = plan.config
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _metadata(plan),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": target},
            "minReplicas": cfg.replicas,
            "maxReplicas": cfg.max_replicas,
            "metrics": [{
                "type": "Pods",
                "pods": {"metric": {"name": metric},
                         "target": {"type": "AverageValue", "averageValue": _quantity(plan.target_load)}},
            }],
            "behavior": scaling_behavior(plan),
        },
    }


def scaled_object(plan: Plan, target: str, query: str) -> dict[str, Any]:
    cfg = plan.config
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": _metadata(plan),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": target},
            "minReplicaCount": cfg.replicas,
            "maxReplicaCount": cfg.max_replicas,
            "pollingInterval": 15,
            "cooldownPeriod": cfg.scale_down_window_s,
            "advanced": {"horizontalPodAutoscalerConfig": {"behavior": scaling_behavior(plan)}},
            "triggers": [{
                "type": "prometheus",
                # the query sums over the replicas; AverageValue divides by them, as the HPA's Pods metric does
                "metricType": "AverageValue",
                "metadata": {"serverAddress": cfg.prometheus_url, "query": query,
                             "threshold": _quantity(plan.target_load)},
            }],
        },
    }


def service_monitor(plan: Plan, selector: dict[str, str] | None = None, port: str = "http") -> dict[str, Any]:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": _metadata(plan),
        "spec": {
            "selector": {"matchLabels": selector or plan.selector},
            "endpoints": [{"port": port, "path": "/metrics", "interval": "15s"}],
        },
    }


def _cpu(cores: float) -> str:
    milli = round(cores * 1000)
    return str(milli // 1000) if milli % 1000 == 0 else f"{milli}m"


def _quantity(value: float) -> str:
    """A Kubernetes quantity as a string (KEDA's threshold must be one; the HPA takes either)."""
    return str(int(value)) if float(value).is_integer() else f"{round(value * 1000)}m"


def _seconds(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))
