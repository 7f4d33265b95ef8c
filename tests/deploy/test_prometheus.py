"""The Prometheus rules of a deployed service: promtool checks them and runs their unit tests offline, and a
real Prometheus scraping real `pkg serve` processes reads the load signal the autoscalers would."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest
import yaml

from live_server import Server, free_port

from bento_like.builders.deploy.prometheus import (
    LOAD_METRIC,
    LOAD_RECORD,
    adapter_rules,
    keda_query,
    pod_regex,
    prometheus_rule,
    rules,
)

SERVICES = Path(__file__).resolve().parents[1] / "serving" / "services"
POD_1 = "iris-7d9f8b6c5d-x2b4q"
POD_2 = "iris-7d9f8b6c5d-hk5zr"
CANARY = "iris-canary-5c8d7f9b4-q2w7z"  # another Deployment whose name starts with the service's


def _needs(*binaries: str) -> None:
    missing = [b for b in binaries if shutil.which(b) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (apt-get install prometheus)")


# -- pod names ------------------------------------------------------------------------------------------------


def _pod_name(deployment: str, pod_template_hash: str, suffix: str) -> str:
    """A pod name as Kubernetes makes it: generateName ``<ReplicaSet>-`` cut to 58 characters, then 5 more."""
    return f"{deployment}-{pod_template_hash}-"[:58] + suffix


@pytest.mark.parametrize("length", [4, 46, 47, 50, 56, 57, 58, 63])
def test_pod_regex_matches_the_deployments_pods_and_not_a_longer_named_deployments(length: int) -> None:
    name = ("iris-" + "x" * 70)[:length]
    pattern = re.compile(pod_regex(name))  # RE2 syntax that Python's re reads the same way
    for pod_template_hash in ("7", "5c8d7f9b4", "7d9f8b6c5d"):
        assert pattern.fullmatch(_pod_name(name, pod_template_hash, "x2b4q"))
    if length <= 46:  # longer names have their pods' names cut, past telling NAME-canary's pods apart
        assert not pattern.fullmatch(_pod_name(name + "-canary", "7d9f8b6c5d", "x2b4q"))
    assert not pattern.fullmatch(f"{name}-0")  # a StatefulSet's pod
    assert not pattern.fullmatch(_pod_name(name, "7d9f8b6c5d", "x2b4q") + "x")


def test_pod_regex_escapes_a_dot_in_the_name() -> None:
    pattern = re.compile(pod_regex("my.iris"))
    assert pattern.fullmatch("my.iris-7d9f8b6c5d-x2b4q")
    assert not pattern.fullmatch("myxiris-7d9f8b6c5d-x2b4q")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"name": "Iris"}, "not a Kubernetes name"),
        ({"namespace": "a.b"}, "not a Kubernetes name"),
        ({"timeout_s": 0}, "timeout_s must be positive"),
        ({"error_ratio": 1.5}, "error_ratio must lie between 0 and 1"),
        ({"for_": "5 minutes"}, "for_ must be a Prometheus duration"),
    ],
)
def test_rules_refuse_bad_arguments_naming_them(kwargs: dict[str, Any], message: str) -> None:
    arguments = {"name": "iris", "namespace": "prod", "timeout_s": 10, **kwargs}
    with pytest.raises(ValueError, match=message):
        rules(arguments.pop("name"), arguments.pop("namespace"), **arguments)


def test_prometheus_rule_carries_the_same_groups() -> None:
    obj = prometheus_rule("iris", "prod", {"release": "kube-prometheus-stack"}, timeout_s=10, for_="2m")
    assert obj["apiVersion"] == "monitoring.coreos.com/v1" and obj["kind"] == "PrometheusRule"
    assert obj["metadata"] == {"name": "iris", "namespace": "prod", "labels": {"release": "kube-prometheus-stack"}}
    assert obj["spec"] == rules("iris", "prod", timeout_s=10, for_="2m")


# -- promtool -------------------------------------------------------------------------------------------------


def _series(name: str, values: str, pod: str = POD_1, namespace: str = "prod", **labels: str) -> dict[str, str]:
    matchers = ",".join(f'{k}="{v}"' for k, v in {"namespace": namespace, "pod": pod, **labels}.items())
    return {"series": f"{name}{{{matchers}}}", "values": values}


def _adapter_query(namespace: str, pods: list[str]) -> str:
    """The query the Prometheus Adapter makes of its rule when an HPA asks for the metric of ``pods``."""
    query = adapter_rules()["rules"][0]["metricsQuery"]
    matchers = f'namespace="{namespace}",pod=~"{"|".join(pods)}"'
    return query.replace("<<.LabelMatchers>>", matchers).replace("<<.GroupBy>>", "pod")


def _load_case() -> dict[str, Any]:
    """Pod 1 holds 2 + 1 requests and 2 tasks (2 of its requests wait in a batch queue: counted once); pod 2 runs
    two workers holding 1 and 2. The canary Deployment and the same names in another namespace must not count."""
    inflight, tasks = "bento_like_requests_in_flight", "bento_like_tasks"
    return {
        "interval": "1m",
        "input_series": [
            _series(inflight, "2x10", api="classify"),
            _series(inflight, "1x10", api="embed"),
            _series("bento_like_queue_depth", "2x10", api="classify"),
            _series(tasks, "1x10", api="embed", status="pending"),
            _series(tasks, "1x10", api="embed", status="in_progress"),
            _series(inflight, "1x10", POD_2, api="classify", worker="1"),
            _series(inflight, "2x10", POD_2, api="classify", worker="2"),
            _series(inflight, "7x10", CANARY, api="classify"),
            _series(inflight, "5x10", POD_1, "staging", api="classify"),
        ],
        "promql_expr_test": [
            {
                "expr": LOAD_RECORD,
                "eval_time": "5m",
                "exp_samples": [
                    {"labels": f'{LOAD_RECORD}{{namespace="prod",pod="{POD_1}"}}', "value": 5},
                    {"labels": f'{LOAD_RECORD}{{namespace="prod",pod="{POD_2}"}}', "value": 3},
                ],
            },
            {"expr": keda_query("iris", "prod"), "eval_time": "5m", "exp_samples": [{"labels": "{}", "value": 8}]},
            {
                "expr": _adapter_query("prod", [POD_1, POD_2, CANARY]),
                "eval_time": "5m",
                "exp_samples": [
                    {"labels": f'{{pod="{POD_1}"}}', "value": 5},
                    {"labels": f'{{pod="{POD_2}"}}', "value": 3},
                    {"labels": f'{{pod="{CANARY}"}}', "value": 7},
                ],
            },
            # no pod of this service scraped: 0, not an empty answer
            {"expr": keda_query("iris", "nowhere"), "eval_time": "5m", "exp_samples": [{"labels": "{}", "value": 0}]},
        ],
    }


def _alerts_case() -> dict[str, Any]:
    """API classify fails 10% (over both pods) and 3% of its requests take 10-30 s; embed fails 1% and answers
    within 1 s; idle has no traffic (0/0). A worker of pod 2 is not ready, and pod 4 cannot be scraped; pod 3 was
    draining before it went away, and the canary's readiness is not this service's."""
    total, ready = "bento_like_requests_total", "bento_like_ready"
    buckets = "bento_like_request_duration_seconds_bucket"
    pod_3, pod_4 = "iris-7d9f8b6c5d-d7rk2", "iris-7d9f8b6c5d-zq9v6"
    series = [
        _series(total, "0+80x20", api="classify", status="200"),
        _series(total, "0+20x20", api="classify", status="500"),
        _series(total, "0+100x20", POD_2, api="classify", status="200"),
        _series(total, "0+100x20", CANARY, api="classify", status="500"),
        _series(total, "0+99x20", api="embed", status="200"),
        _series(total, "0+1x20", api="embed", status="503"),
        _series(total, "5x20", api="idle", status="200"),
        _series(ready, "1x20"),
        _series(ready, "1x20", POD_2, worker="1"),
        _series(ready, "0x20", POD_2, worker="2"),
        _series(ready, "1 1 0 0 stale", pod_3),
        _series(ready, "0x20", CANARY),
        _series("up", "1x20", POD_1),
        _series("up", "1x20", POD_2),
        _series("up", "0x20", pod_4),
    ]
    for le, classify, embed in (("1", 90, 100), ("10", 97, 100), ("30", 100, 100), ("+Inf", 100, 100)):
        series.append(_series(buckets, f"0+{classify}x20", api="classify", status="200", le=le))
        series.append(_series(buckets, f"0+{embed}x20", api="embed", status="200", le=le))
        series.append(_series(buckets, "3x20", api="idle", status="200", le=le))
    where = "service iris (namespace prod)"
    not_ready = [
        {
            "exp_labels": {"severity": "warning", "service": "iris", "namespace": "prod", "pod": pod},
            "exp_annotations": {
                "summary": f"Pod {pod} of {where} is not ready",
                "description": f"Pod {pod} of {where} has not been ready for 5m: its /readyz answers 503 (starting, "
                               "failed or draining) or its /metrics cannot be scraped.",
            },
        }
        for pod in (POD_2, pod_4)
    ]
    return {
        "interval": "1m",
        "input_series": series,
        "alert_rule_test": [
            # nothing fires before it has held for 5m
            {"eval_time": "3m", "alertname": name, "exp_alerts": []}
            for name in ("BentoLikeHighErrorRatio", "BentoLikeHighLatency", "BentoLikePodNotReady")
        ] + [
            {
                "eval_time": "10m",
                "alertname": "BentoLikeHighErrorRatio",
                "exp_alerts": [{
                    "exp_labels": {"severity": "critical", "service": "iris", "namespace": "prod", "api": "classify"},
                    "exp_annotations": {
                        "summary": f"API classify of {where} fails 10% of its requests",
                        "description": f"10% of the requests to API classify of {where} were answered with a 5xx "
                                       "status over the last 5m, above the limit of 5%.",
                    },
                }],
            },
            {
                "eval_time": "10m",
                "alertname": "BentoLikeHighLatency",
                "exp_alerts": [{
                    "exp_labels": {"severity": "warning", "service": "iris", "namespace": "prod", "api": "classify"},
                    "exp_annotations": {
                        # p99 lies 2/3 into the 10-30 s bucket
                        "summary": f"API classify of {where} has a p99 latency of 23.33s",
                        "description": f"The 99th percentile latency of API classify of {where} was 23.33s over "
                                       "the last 5m, above the service's timeout of 10s: its slowest requests "
                                       "time out.",
                    },
                }],
            },
            {"eval_time": "10m", "alertname": "BentoLikePodNotReady", "exp_alerts": not_ready},
        ],
    }


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60)


def test_promtool_checks_the_rules_and_their_unit_tests_pass(tmp_path: Path) -> None:
    _needs("promtool")
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(yaml.safe_dump(rules("iris", "prod", timeout_s=10, error_ratio=0.05, for_="5m")))
    operator_spec = tmp_path / "operator.yaml"
    operator_spec.write_text(yaml.safe_dump(prometheus_rule("iris", "prod", timeout_s=10)["spec"]))
    checked = _promtool("check", "rules", str(rules_file), str(operator_spec))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 4 rules found" in checked.stdout

    tests_file = tmp_path / "rules_test.yaml"
    tests_file.write_text(yaml.safe_dump({
        "rule_files": [rules_file.name],
        "evaluation_interval": "1m",
        "tests": [_load_case(), _alerts_case()],
    }))
    tested = _promtool("test", "rules", str(tests_file))
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout
