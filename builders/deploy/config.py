"""The ``deploy:`` section of a build config: how ``pkg deploy render`` turns a bento into cluster objects.

Every field has a default derived from the ``@service`` declaration or from what model servers need; the section
only holds what a team wants otherwise. ``pkg build`` checks it (an unknown key fails the build, not the deploy)
and records it in the bento's manifest; ``pkg deploy render`` reads it from there, and its flags win over it.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import msgspec

Target = Literal["kubernetes", "kserve"]
Autoscale = Literal["hpa", "keda", "none"]
Monitoring = Literal["annotations", "servicemonitor"]
Probe = Literal["http", "exec"]

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
# a Service's name starts with a letter; 50 leaves room for KServe's "-predictor" and pods' generated suffixes
_OBJECT_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,48}[a-z0-9])?$")


class DeployConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, omit_defaults=True):
    target: Target = "kubernetes"
    """kubernetes: Deployment + Service; kserve: an InferenceService whose predictor is the bento's image."""
    name: str | None = None
    """The objects' name [the service's name, as a DNS label]."""
    namespace: str | None = None
    """Written into the kustomization; none leaves it to ``kubectl -n`` or the context."""
    replicas: int = 1
    """Replicas without autoscaling; the minimum with it."""
    max_replicas: int = 10
    autoscale: Autoscale = "hpa"
    target_load: float | None = None
    """Requests held per replica (in flight plus queued) the autoscaler aims at [half the service's
    max_concurrency, else its largest batch, else 8]."""
    scale_down_window_s: int = 600
    """How long the load must stay low before replicas are removed: model replicas are slow to bring back."""
    startup_s: float | None = None
    """How long the server takes to become ready (loading models): the startup probe allows 3 times this
    [measured with --measure-startup, else estimated from the models' sizes]."""
    drain_s: float = 5.0
    """Seconds a terminating pod keeps serving while endpoints and proxies stop sending it requests."""
    graceful_timeout_s: float | None = None
    """Seconds in-flight requests get after the drain [the service's traffic.timeout]."""
    port: int = 3000
    probe: Probe = "http"
    """http: the kubelet asks /readyz and /livez; exec: ``python3 -m bento_like probe`` inside the container
    (runtimes that only run exec health checks, such as podman kube play)."""
    monitoring: Monitoring = "annotations"
    """annotations: prometheus.io/* on the pods; servicemonitor: a ServiceMonitor and a PrometheusRule
    (clusters with the Prometheus Operator)."""
    prometheus_url: str = "http://prometheus-operated.monitoring.svc:9090"
    """Where KEDA reads the autoscaling signal."""
    gpu_node_label: str = "nvidia.com/gpu.product"
    """The node label that ``resources.gpu_type`` selects on (GPU feature discovery's)."""
    node_selector: dict[str, str] = {}
    tolerations: list[dict[str, Any]] = []
    labels: dict[str, str] = {}
    annotations: dict[str, str] = {}
    image_pull_secrets: list[str] = []
    service_account: str | None = None
    env: dict[str, str] = {}
    """Environment of the server's container, beside what the image sets (never secrets: use a Secret)."""
    model_image: str | None = None
    """KServe only: a modelcar image (``pkg containerize --model-only``) mounted as the models, ``oci://``."""

    def __post_init__(self) -> None:
        if self.name is not None and not _OBJECT_NAME.match(self.name):
            raise ValueError(f"name {self.name!r} must be lowercase letters, digits and '-', start with a letter "
                             "and have at most 50 characters")
        if self.namespace is not None and not _DNS_LABEL.match(self.namespace):
            raise ValueError(f"namespace {self.namespace!r} must be a DNS label")
        if self.replicas < 1 or self.max_replicas < self.replicas:
            raise ValueError(f"replicas ({self.replicas}) must be at least 1 and at most max_replicas "
                             f"({self.max_replicas})")
        for field in ("target_load", "startup_s", "graceful_timeout_s"):
            value = getattr(self, field)
            if value is not None and not value > 0:
                raise ValueError(f"{field} must be a positive number, got {value}")
        if self.drain_s < 0 or self.scale_down_window_s < 0:
            raise ValueError("drain_s and scale_down_window_s must not be negative")
        if not 0 < self.port < 65536:
            raise ValueError(f"port {self.port} is not a TCP port")
        if self.model_image is not None and self.target != "kserve":
            raise ValueError("model_image (a KServe modelcar) needs target: kserve")


class DeployConfigError(ValueError):
    """The deploy section or a flag has a value it cannot take; the message names it."""


def parse_config(data: Any, where: str) -> DeployConfig:
    """``data`` (a mapping from YAML or the manifest) as a DeployConfig; DeployConfigError names the key."""
    if data is None:
        return DeployConfig()
    try:
        return msgspec.convert(data, DeployConfig)
    except msgspec.ValidationError as exc:
        message, _, path = str(exc).rpartition(" - at `")
        key = path.rstrip("`").removeprefix("$").lstrip(".") if message else ""
        text = message or str(exc)
        if text.startswith("Object contains unknown field"):
            field = text.split("`")[1]
            text = f"unknown key {field!r}; the keys are {', '.join(DeployConfig.__struct_fields__)}"
        raise DeployConfigError(f"{where}{'.' + key if key else ''}: {text}") from None


def with_overrides(config: DeployConfig, **flags: Any) -> DeployConfig:
    """The config with the flags that were given (not None) in place of its own values, checked again."""
    given = {k: v for k, v in flags.items() if v is not None}
    if not given:
        return config
    try:
        return msgspec.convert({**msgspec.to_builtins(config), **given}, DeployConfig)
    except msgspec.ValidationError as exc:
        raise DeployConfigError(str(exc)) from None


def as_manifest_section(config: DeployConfig) -> dict[str, Any]:
    """What the bento manifest records: only what differs from the defaults."""
    return msgspec.to_builtins(config)
