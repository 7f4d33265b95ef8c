"""A bento as a KServe InferenceService: the bento's image as a custom predictor container speaking the Open
Inference Protocol v2 (which ``pkg serve`` answers under /v2), optionally with its models from a modelcar image.

RawDeployment mode: KServe makes a plain Deployment ``<name>-predictor``, so the probes, drain and autoscaler
are the same as for the kubernetes target; KServe's own autoscaler is switched off for ours.
"""

from __future__ import annotations

from typing import Any

from . import kubernetes as k8s
from .kubernetes import Plan

API_VERSION = "serving.kserve.io/v1beta1"
PREDICTOR_CONTAINER = "kserve-container"  # the name KServe looks for in a custom predictor
ISVC_LABEL = "serving.kserve.io/inferenceservice"


def predictor_deployment(name: str) -> str:
    """The Deployment KServe makes for the predictor in RawDeployment mode (what an autoscaler targets)."""
    return f"{name}-predictor"


def inference_service(plan: Plan, models_env: dict[str, str]) -> dict[str, Any]:
    cfg = plan.config
    pod = k8s.pod_spec(plan)
    container = pod["containers"][0]
    container["name"] = PREDICTOR_CONTAINER
    # Knative and KServe name the HTTP/1 port of a container `http1`
    container["ports"] = [{"name": "http1", "containerPort": cfg.port, "protocol": "TCP"}]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe].get("httpGet")
        if get is not None:
            get["port"] = cfg.port
    env = {e["name"]: e["value"] for e in container["env"]}
    if cfg.model_image:
        # KServe runs the modelcar beside this container and shows its /models here; the server reads the
        # bento's models from there, checked against the digests the bento records
        env.update({"STORAGE_URI": f"oci://{cfg.model_image.removeprefix('oci://')}", **models_env})
    container["env"] = [{"name": k, "value": v} for k, v in sorted(env.items())]
    meta = k8s.pod_metadata(plan)
    predictor: dict[str, Any] = {
        "minReplicas": cfg.replicas,
        "maxReplicas": cfg.max_replicas if cfg.autoscale != "none" else cfg.replicas,
        "labels": meta["labels"],
        "annotations": meta["annotations"],
        **pod,
    }
    annotations = {
        "serving.kserve.io/deploymentMode": "RawDeployment",
        # the autoscaler rendered beside it (or none) scales the predictor, not KServe's CPU-based HPA
        "serving.kserve.io/autoscalerClass": "external",
        **cfg.annotations,
    }
    return {
        "apiVersion": API_VERSION,
        "kind": "InferenceService",
        "metadata": {"name": plan.name, "labels": dict(plan.labels), "annotations": dict(sorted(annotations.items()))},
        "spec": {"predictor": predictor},
    }
