"""``pkg deploy render``: a bento and its pushed image as a kustomize tree, or as one stream of YAML documents.

    DIR/base/                  the objects, derived from the @service declaration and the deploy: section
    DIR/overlays/<version>/    this version: the image (tag, and digest when the registry told it), its labels
    DIR/monitoring/            Prometheus rules, and the Prometheus Adapter rule an HPA on the signal needs

The base follows the latest render; each version keeps its overlay, so a rollout (or a rollback) is applying
another overlay, which changes only the image unless the declaration changed too (the summary says so).
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ...bentos import Bento, BentoError, BentoManifest
from . import kserve, kubernetes as k8s, prometheus
from .config import DeployConfig, DeployConfigError, parse_config, with_overrides

KUSTOMIZE_API = "kustomize.config.k8s.io/v1beta1"
VERSION_LABEL = "app.kubernetes.io/version"
BENTO_ANNOTATION = f"{k8s.ANNOTATION_PREFIX}/bento"
DEFAULT_TARGET_LOAD = 8.0
MAX_NAME = 50  # leaves room for KServe's "-predictor" and the pod name's generated suffixes
# What loading models costs before a server is ready, for a startup budget when nothing was declared or
# measured: a fixed part (imports, instances) and a read rate low enough for network-attached volumes.
STARTUP_BASE_S = 10.0
STARTUP_READ_BPS = 50e6
STARTUP_FACTOR = 3  # the budget over the expected time: a busy node loads slower than the machine measured
MIN_STARTUP_BUDGET_S = 60


class DeployError(BentoError):
    """The bento cannot be rendered as asked; the message says what to change."""


@dataclass(frozen=True)
class Rendered:
    """The files of a render (paths relative to its output directory), and what to tell the person."""

    plan: k8s.Plan
    files: dict[str, str]
    overlay: str  # e.g. overlays/<version>
    documents: list[dict[str, Any]]  # what `kubectl kustomize <overlay>` gives: the objects, image pinned
    startup_source: str
    image: str  # as the overlay pins it: REPO:TAG@DIGEST when the registry told the digest
    notes: list[str] = field(default_factory=list)

    def write(self, out: Path) -> list[str]:
        """Write every file; return those whose content changed (a base file among them means this version
        changes more than the image)."""
        changed = []
        for rel, text in self.files.items():
            path = out / rel
            if path.is_file() and path.read_text() == text:
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            changed.append(rel)
        return changed

    def stream(self) -> str:
        """The objects as one multi-document YAML (``-o -``)."""
        return _dump_all(self.documents)


def object_name(service_name: str) -> str:
    """The service's name as a DNS-1035 label (a Service's name must start with a letter)."""
    name = re.sub(r"[^a-z0-9-]+", "-", service_name.lower()).strip("-")
    if name and not name[0].isalpha():
        name = "svc-" + name
    name = name[:MAX_NAME].rstrip("-")
    if not name:
        raise DeployError(f"service name {service_name!r} gives no DNS name: set deploy.name")
    return name


def config_of(info: BentoManifest, **flags: Any) -> DeployConfig:
    """The bento's deploy section with the flags that were given over it."""
    try:
        return with_overrides(parse_config(info.deploy or None, f"bento {info.tag} deploy"), **flags)
    except (DeployConfigError, ValueError) as exc:
        raise DeployError(str(exc)) from None


def plan_for(bento: Bento, config: DeployConfig, image: str, measured_startup_s: float | None = None) -> tuple[k8s.Plan, str]:
    """The plan, and where its startup budget came from."""
    info = bento.info
    name = config.name or object_name(info.service_name)
    res, traffic = pod_resources(info), info.traffic
    if config.startup_s is not None:
        expected, source = config.startup_s, f"declared deploy.startup_s {config.startup_s:g} s"
    elif measured_startup_s is not None:
        expected, source = measured_startup_s, f"measured: ready in {measured_startup_s:.1f} s here"
    else:
        size = sum(m.size for m in info.models)
        expected = STARTUP_BASE_S + size / STARTUP_READ_BPS
        source = (f"estimated from {size / 1e6:.0f} MB of models; set deploy.startup_s or pass --measure-startup")
    budget = max(MIN_STARTUP_BUDGET_S, math.ceil(STARTUP_FACTOR * expected))
    labels = {k8s.NAME_LABEL: name, "app.kubernetes.io/component": "model-server",
              "app.kubernetes.io/managed-by": "bento-like", **config.labels}
    plan = k8s.Plan(
        name=name,
        config=config,
        image=image,
        bento=info.tag,
        service=info.service_name,
        apis=tuple(api.name for api in info.apis),
        timeout_s=float(traffic.get("timeout") or 60.0),
        cpu=res.get("cpu"),
        memory=res.get("memory"),
        gpu=int(res.get("gpu") or 0),
        gpu_type=res.get("gpu_type"),
        startup_budget_s=budget,
        graceful_s=config.graceful_timeout_s or float(traffic.get("timeout") or 60.0),
        target_load=config.target_load or _default_target(info),
        labels=dict(sorted(labels.items())),
    )
    return plan, source


# Kubernetes' quantity forms, as @service(resources={"memory": ...}) accepts them
_QUANTITY = re.compile(r"^(\d+(?:\.\d+)?|\.\d+)([eE]\d+|[KMGTPE]i|[kMGTPE]|m)?$")
_FACTORS: dict[str | None, float] = {None: 1, "m": 1e-3, **{s: 1000.0 ** (i + 1) for i, s in enumerate("kMGTPE")},
                                     **{s + "i": 1024.0 ** (i + 1) for i, s in enumerate("KMGTPE")}}


def pod_resources(info: BentoManifest) -> dict[str, Any]:
    """What one pod needs: the service's resources plus those of the dependencies ``pkg serve`` runs beside it
    in the same container (docs/distributed.md)."""
    parts = [info.resources] + [dep.resources for dep in info.dependencies]
    cpus = [p["cpu"] for p in parts if p.get("cpu") is not None]
    memories = [p["memory"] for p in parts if p.get("memory") is not None]
    gpu_types = {p["gpu_type"] for p in parts if p.get("gpu_type")}
    if len(gpu_types) > 1:
        raise DeployError(f"bento {info.tag}: the service and its dependencies ask for different GPU types "
                          f"({', '.join(sorted(gpu_types))}); one pod runs on one node")
    total: dict[str, Any] = {"gpu": sum(int(p.get("gpu") or 0) for p in parts),
                             "gpu_type": gpu_types.pop() if gpu_types else None}
    total["cpu"] = sum(cpus) if cpus else None
    if len(memories) == 1:
        total["memory"] = memories[0]
    elif memories:
        size = 0
        for memory in memories:
            match = _QUANTITY.match(str(memory).strip())
            if match is None:
                raise DeployError(f"bento {info.tag}: memory {memory!r} is not a quantity such as 512Mi")
            suffix = match[2]
            factor = 10.0 ** int(suffix[1:]) if suffix and suffix[0] in "eE" else _FACTORS[suffix]
            size += float(match[1]) * factor
        total["memory"] = f"{math.ceil(size / 2**20)}Mi"
    else:
        total["memory"] = None
    return total


def _default_target(info: BentoManifest) -> float:
    """Half the declared concurrency (room for the replicas being added), else one full batch per replica."""
    concurrency = info.traffic.get("max_concurrency")
    if concurrency:
        return max(1.0, math.floor(concurrency / 2))
    batches = [api.max_batch_size for api in info.apis if api.batchable]
    return float(max(batches)) if batches else DEFAULT_TARGET_LOAD


def render(bento: Bento, image: str, config: DeployConfig, *, digest: str | None = None,
           measured_startup_s: float | None = None, models_env: dict[str, str] | None = None) -> Rendered:
    """The kustomize tree of ``bento`` deployed from ``image`` (REGISTRY/REPO:TAG), as ``config`` says."""
    repo, tag = _split_image(image)
    # the base names the repository only: each version's overlay sets the tag (and digest)
    plan, startup_source = plan_for(bento, config, repo, measured_startup_s)
    if config.model_image and not bento.info.models:
        raise DeployError(f"bento {bento.info.tag} has no models: a modelcar (model_image) has nothing to carry")
    base = _objects(plan, models_env or {})
    monitoring = _monitoring_files(plan)
    version = bento.info.version
    overlay = f"overlays/{version}"
    files: dict[str, str] = {}
    resources = []
    for doc in base:
        rel = f"{doc['kind'].lower()}.yaml"
        files[f"base/{rel}"] = _dump(doc)
        resources.append(rel)
    kustomization: dict[str, Any] = {"apiVersion": KUSTOMIZE_API, "kind": "Kustomization"}
    if config.namespace:
        kustomization["namespace"] = config.namespace
    kustomization["resources"] = resources
    files["base/kustomization.yaml"] = _dump(kustomization)
    image_entry: dict[str, Any] = {"name": repo, "newTag": tag}
    if digest:
        image_entry["digest"] = digest
    files[f"{overlay}/kustomization.yaml"] = _dump({
        "apiVersion": KUSTOMIZE_API,
        "kind": "Kustomization",
        "resources": ["../../base"],
        "images": [image_entry],
        "labels": [{"pairs": {VERSION_LABEL: version}, "includeTemplates": True}],
        "commonAnnotations": {BENTO_ANNOTATION: bento.info.tag},
    })
    files.update(monitoring)
    pinned = f"{repo}:{tag}" + (f"@{digest}" if digest else "")
    documents = [_as_overlay(doc, plan, pinned, version, bento.info.tag) for doc in base]
    notes = _notes(plan, bento.info)
    return Rendered(plan, files, overlay, documents, startup_source, pinned, notes)


def _objects(plan: k8s.Plan, models_env: dict[str, str]) -> list[dict[str, Any]]:
    cfg = plan.config
    target = _workload(plan)
    if cfg.target == "kserve":
        docs = [kserve.inference_service(plan, models_env), k8s.disruption_budget(plan)]
    else:
        docs = [k8s.deployment(plan), k8s.service(plan), k8s.disruption_budget(plan)]
    if cfg.autoscale == "hpa":
        docs.append(k8s.horizontal_autoscaler(plan, target, prometheus.LOAD_METRIC))
    elif cfg.autoscale == "keda":
        if not cfg.namespace:
            raise DeployError("--autoscale keda needs the namespace the pods will run in (deploy.namespace or "
                              "--namespace): its query sums the load of the service's pods, and without one it "
                              "would count a same-named Deployment of every namespace")
        docs.append(k8s.scaled_object(plan, target, prometheus.keda_query(target, cfg.namespace)))
    if cfg.monitoring == "servicemonitor":
        if cfg.target == "kubernetes":
            docs.append(k8s.service_monitor(plan))
        rule = prometheus.prometheus_rule(target, cfg.namespace, plan.labels, timeout_s=plan.timeout_s)
        rule["metadata"]["name"] = plan.name
        docs.append(rule)
    return docs


def _workload(plan: k8s.Plan) -> str:
    """The Deployment whose pods serve: the plan's own, or the one KServe makes."""
    return kserve.predictor_deployment(plan.name) if plan.config.target == "kserve" else plan.name


def _monitoring_files(plan: k8s.Plan) -> dict[str, str]:
    header = (f"# Prometheus rules for {plan.name}: the autoscaling signal ({prometheus.LOAD_RECORD}) and alerts.\n"
              "# Check them with `promtool check rules`; load them with rule_files (or use the PrometheusRule\n"
              "# that --monitoring servicemonitor renders).\n")
    files = {"monitoring/prometheus-rules.yaml": header + _dump(
        prometheus.rules(_workload(plan), plan.config.namespace, timeout_s=plan.timeout_s))}
    if plan.config.autoscale == "hpa":
        files["monitoring/prometheus-adapter-rules.yaml"] = (
            f"# Add to the Prometheus Adapter's config (its `rules:`), so that the HPA of {plan.name} can read\n"
            f"# the Pods metric {prometheus.LOAD_METRIC}.\n" + _dump(prometheus.adapter_rules()))
    return files


def _as_overlay(doc: dict[str, Any], plan: k8s.Plan, image: str, version: str, bento: str) -> dict[str, Any]:
    """``doc`` as kustomize builds the overlay: the pinned image, the version label, the bento annotation."""
    out = copy.deepcopy(doc)
    _label(out["metadata"], version, bento)
    spec = out.get("spec", {})
    if out["kind"] == "Deployment":
        _label(spec["template"]["metadata"], version, bento)
        containers = spec["template"]["spec"]["containers"]
    elif out["kind"] == "InferenceService":
        containers = spec["predictor"]["containers"]
    else:
        containers = []
    for c in containers:
        if c["image"] == plan.image:
            c["image"] = image
    if plan.config.namespace:
        out["metadata"]["namespace"] = plan.config.namespace
    return out


def _label(meta: dict[str, Any], version: str, bento: str) -> None:
    meta["labels"] = {**meta.get("labels", {}), VERSION_LABEL: version}
    meta["annotations"] = {**meta.get("annotations", {}), BENTO_ANNOTATION: bento}


def _notes(plan: k8s.Plan, info: BentoManifest) -> list[str]:
    notes = []
    if plan.cpu is None and plan.memory is None:
        notes.append("no resources declared: the scheduler places pods blind and nothing bounds their memory "
                     "(@service(resources={'cpu': ..., 'memory': ...}))")
    for dep in info.dependencies:
        notes.append(f"dependency {dep.name} runs inside each pod, as `pkg serve` runs it locally; its resources "
                     "are added to the pod's")
    return notes


def _split_image(image: str) -> tuple[str, str]:
    """REGISTRY/REPO:TAG -> (REGISTRY/REPO, TAG); a digest belongs in --digest, found by the registry check."""
    name = image.removeprefix("docker://")
    if "@" in name:
        raise DeployError(f"image {image!r}: name a tag (REGISTRY/REPO:TAG); the digest is looked up and pinned")
    if name.rfind(":") <= name.rfind("/"):
        raise DeployError(f"image {image!r} has no tag: name it REGISTRY/REPO:TAG, as `pkg push` pushed it")
    repo, _, tag = name.rpartition(":")
    if not re.fullmatch(r"[\w][\w.-]{0,127}", tag) or not repo:
        raise DeployError(f"image {image!r}: {tag!r} is not a valid tag")
    return repo, tag


class _Dumper(yaml.SafeDumper):
    """Block style, keys in the order written, and no aliases (a document reads on its own)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _dump(doc: Any) -> str:
    return yaml.dump(doc, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120)


def _dump_all(docs: list[dict[str, Any]]) -> str:
    return yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120)
