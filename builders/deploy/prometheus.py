"""Prometheus rules for a deployed service: the load signal autoscalers read, and the alerts worth waking for.

The signal is the work a replica holds: requests in flight (a request waiting in a batch queue is already one of
them, so ``bento_like_queue_depth`` is not added again) plus the tasks it holds, pending or running (a running
task calls the API without being an HTTP request, so ``in_flight`` never counts it). CPU says little about a
model server: a replica waiting on a GPU, or batching, is busy at low CPU, while the queue it holds is exactly
what a new replica would take off it.

Every function returns plain dicts or strings; the deploy renderer writes them as YAML next to the manifests. A
service's pods are picked by ``namespace`` and a ``pod`` regex that matches its Deployment's pod names only, the
labels that Kubernetes pod discovery and a ServiceMonitor both attach.
"""

from __future__ import annotations

import re
from typing import Any

LOAD_METRIC = "bento_like_load"
"""The custom Pods metric an HPA names (``type: Pods``), as the Prometheus Adapter exposes it."""
LOAD_RECORD = "namespace_pod:bento_like_load:sum"
"""The recording rule of the signal, one series per pod (labels namespace, pod), for dashboards and alerts."""

_LOAD_SERIES = ("bento_like_requests_in_flight", "bento_like_tasks")
_LOAD_NAMES = f'__name__=~"{"|".join(_LOAD_SERIES)}"'  # both series, in one selector
_WINDOW = "5m"  # rate window of the alerts: several scrapes even at a 1 m scrape interval
# Kubernetes' generated names (pod-template-hash, pod suffix) use this alphabet: no vowels, no 0, 1 or 3.
_GENERATED = "[bcdfghjklmnpqrstvwxz2456789]"
_MAX_GENERATED_BASE = 58  # the API server cuts a generateName to this length before adding 5 characters
_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DURATION = re.compile(r"^(\d+y)?(\d+w)?(\d+d)?(\d+h)?(\d+m)?(\d+s)?(\d+ms)?$")


def pod_regex(name: str) -> str:
    """The RE2 pattern (anchored, as PromQL anchors it) of the pod names of the Deployment ``name``:
    ``NAME-<pod-template-hash>-<5 characters>``. Neither part holds a dash, so the pods of a Deployment
    ``NAME-canary`` (``NAME-canary-<hash>-<id>``) do not match, as long as NAME has at most 46 characters: past
    that Kubernetes cuts pod names to 63, and the cut names of such a Deployment may match too."""
    _check(_SUBDOMAIN, name, "name", 253)
    # The ReplicaSet is NAME-<hash>; its pods' generateName NAME-<hash>- is cut to 58 characters for a long NAME.
    room = _MAX_GENERATED_BASE - len(name) - 1  # characters of "<hash>-" left after "NAME-"
    suffix = f"{_GENERATED}{{5}}"
    if room < 0:
        return _dots(name[:_MAX_GENERATED_BASE]) + suffix
    kept = []  # what may stand between "NAME-" and the suffix; nothing when NAME is 57 characters long
    if room > 1:
        kept.append(f"{_GENERATED}{{1,{min(room - 1, 10)}}}-")  # the whole hash and its dash
    if 0 < room <= 10:
        kept.append(f"{_GENERATED}{{{room}}}")  # a hash cut short, its dash gone
    middle = f"(?:{'|'.join(kept)})" if len(kept) > 1 else "".join(kept)
    return f"{_dots(name)}-{middle}{suffix}"


def selector(name: str, namespace: str | None) -> str:
    """The label matchers of the pods of service ``name`` in ``namespace``, for inside ``{...}``. With no
    namespace (the manifests leave it to ``kubectl -n``), the pods of every namespace: the rules group by
    namespace, so each namespace's pods are still judged apart."""
    pods = f'pod=~"{_promql_string(pod_regex(name))}"'
    if namespace is None:
        return pods
    _check(_LABEL, namespace, "namespace", 63)
    return f'namespace="{namespace}",{pods}'


def load_expr(name: str, namespace: str | None) -> str:
    """Every series the signal sums, for the service's pods: one selector over both names. Not ``+``: a service
    without task APIs has no ``bento_like_tasks`` series, and ``+`` with an absent side is empty. Not ``or``
    either: it drops a series whose labels equal one already on its left."""
    return f"{{{_LOAD_NAMES},{selector(name, namespace)}}}"


def keda_query(name: str, namespace: str) -> str:
    """The PromQL of a KEDA Prometheus trigger: the service's total load. It reads the raw series, not the
    recording rule, so it needs no rules file and lags no rule evaluation. ``or vector(0)``: a service with no pod
    scraped yet (or scaled to zero) reads 0, not an empty answer, which KEDA reports as an error when the trigger
    sets ``ignoreNullValues: "false"``. It sums over pods, so it needs the namespace they run in: the same
    Deployment name in another namespace would be counted too."""
    if namespace is None:
        raise ValueError("the KEDA query needs the namespace the pods run in")
    return f"sum({load_expr(name, namespace)}) or vector(0)"


def rules(
    name: str,
    namespace: str | None,
    *,
    timeout_s: float,
    error_ratio: float = 0.05,
    for_: str = "5m",
    interval: str | None = None,
) -> dict[str, Any]:
    """A Prometheus rules file (``{"groups": [...]}``) for service ``name``: the per-pod load record and three
    alerts, each per API or per pod, labelled ``severity`` and ``service``:

    - ``BentoLikeHighErrorRatio`` (critical): answers with a 5xx status over all answers above ``error_ratio``;
    - ``BentoLikeHighLatency`` (warning): p99 latency above ``timeout_s``, the service's declared timeout;
    - ``BentoLikePodNotReady`` (warning): ``bento_like_ready`` is 0 (for any worker), or the pod cannot be
      scraped.

    An API with no traffic gives 0/0 (NaN) ratios and quantiles, and NaN compares false, so it never alerts;
    an error series that does not exist yet leaves the ratio absent, so it never alerts either. ``interval``
    sets the group's evaluation interval (Prometheus' global one when None)."""
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be positive, not {timeout_s!r}")
    if not 0 < error_ratio < 1:
        raise ValueError(f"error_ratio must lie between 0 and 1, not {error_ratio!r}")
    for field, value in (("for_", for_), ("interval", interval)):
        if value is not None and not (value and _DURATION.match(value)):
            raise ValueError(f"{field} must be a Prometheus duration such as 30s or 5m, not {value!r}")
    sel = selector(name, namespace)
    where = f"service {name} (namespace {namespace or '{{ $labels.namespace }}'})"
    group: dict[str, Any] = {"name": f"bento_like-{name}"}
    if interval is not None:
        group["interval"] = interval
    group["rules"] = [
        {"record": LOAD_RECORD, "expr": f"sum by (namespace, pod) ({load_expr(name, namespace)})"},
        {
            "alert": "BentoLikeHighErrorRatio",
            "expr": (
                f'sum by (namespace, api) (rate(bento_like_requests_total{{{sel},status=~"5.."}}[{_WINDOW}]))'
                f" / sum by (namespace, api) (rate(bento_like_requests_total{{{sel}}}[{_WINDOW}]))"
                f" > {_num(error_ratio)}"
            ),
            "for": for_,
            "labels": {"severity": "critical", "service": name},
            "annotations": {
                "summary": f"API {{{{ $labels.api }}}} of {where} fails {{{{ $value | humanizePercentage }}}} "
                           "of its requests",
                "description": f"{{{{ $value | humanizePercentage }}}} of the requests to API {{{{ $labels.api }}}} "
                               f"of {where} were answered with a 5xx status over the last {_WINDOW}, above "
                               f"the limit of {_percent(error_ratio)}.",
            },
        },
        {
            "alert": "BentoLikeHighLatency",
            "expr": (
                f"histogram_quantile(0.99, sum by (namespace, api, le) "
                f"(rate(bento_like_request_duration_seconds_bucket{{{sel}}}[{_WINDOW}])))"
                f" > {_num(timeout_s)}"
            ),
            "for": for_,
            "labels": {"severity": "warning", "service": name},
            "annotations": {
                "summary": f"API {{{{ $labels.api }}}} of {where} has a p99 latency of "
                           "{{ $value | humanizeDuration }}",
                "description": f"The 99th percentile latency of API {{{{ $labels.api }}}} of {where} was "
                               f"{{{{ $value | humanizeDuration }}}} over the last {_WINDOW}, above the "
                               f"service's timeout of {_num(timeout_s)}s: its slowest requests time out.",
            },
        },
        {
            "alert": "BentoLikePodNotReady",
            # min over workers: a pod with one worker not ready answers /readyz with 503 on that worker
            "expr": (
                f"min by (namespace, pod) (bento_like_ready{{{sel}}}) == 0"
                f" or max by (namespace, pod) (up{{{sel}}}) == 0"
            ),
            "for": for_,
            "labels": {"severity": "warning", "service": name},
            "annotations": {
                "summary": f"Pod {{{{ $labels.pod }}}} of {where} is not ready",
                "description": f"Pod {{{{ $labels.pod }}}} of {where} has not been ready for {for_}: its /readyz "
                               "answers 503 (starting, failed or draining) or its /metrics cannot be scraped.",
            },
        },
    ]
    return {"groups": [group]}


def prometheus_rule(
    name: str, namespace: str | None, labels: dict[str, str] | None = None, **options: Any
) -> dict[str, Any]:
    """The rules of :func:`rules` as a ``monitoring.coreos.com/v1`` PrometheusRule, for clusters with the
    Prometheus Operator; ``labels`` are those its ``ruleSelector`` picks (``release: ...``, say)."""
    metadata: dict[str, Any] = {"name": name}
    if namespace is not None:
        metadata["namespace"] = namespace
    if labels:
        metadata["labels"] = dict(labels)
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": metadata,
        "spec": rules(name, namespace, **options),
    }


def adapter_rules() -> dict[str, Any]:
    """The Prometheus Adapter (kubernetes-sigs/prometheus-adapter) config that serves the signal as the custom
    Pods metric ``LOAD_METRIC``, for an HPA ``type: Pods`` metric. One rule serves every service: the HPA's pod
    selector becomes ``<<.LabelMatchers>>``. Like :func:`keda_query` it reads the raw series, so it works
    without the rules file and lags no rule evaluation."""
    return {
        "rules": [
            {
                "seriesQuery": f'{_LOAD_SERIES[0]}{{namespace!="",pod!=""}}',
                "resources": {"overrides": {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}},
                "name": {"matches": f"^{_LOAD_SERIES[0]}$", "as": LOAD_METRIC},
                # not <<.Series>>: the signal spans two series names; the discovered one is only its handle
                "metricsQuery": f"sum by (<<.GroupBy>>) ({{{_LOAD_NAMES},<<.LabelMatchers>>}})",
            }
        ]
    }


def _check(pattern: re.Pattern[str], value: str, what: str, limit: int) -> None:
    if len(value) > limit or not pattern.match(value):
        raise ValueError(f"{what} {value!r} is not a Kubernetes name (lowercase letters, digits and '-', at most "
                         f"{limit} characters)")


def _dots(name: str) -> str:
    """``name`` as a regex: of a Kubernetes name's characters only the dot means something else there."""
    return name.replace(".", "\\.")


def _promql_string(text: str) -> str:
    """``text`` inside a double-quoted PromQL string, whose backslash escapes are Go's."""
    return text.replace("\\", "\\\\").replace('"', '\\"')


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _percent(ratio: float) -> str:
    return f"{ratio * 100:g}%"
