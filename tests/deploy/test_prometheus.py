"""The Prometheus rules of a deployed service: promtool checks them and runs their unit tests offline, and a
real Prometheus scraping real `pkg serve` processes reads the load signal the autoscalers would."""

from __future__ import annotations

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


# -- a real Prometheus scraping real servers ---------------------------------------------------------------------

HOLD_S = 8.0  # how long each held request sleeps: under the service's 10 s timeout, over a few scrapes


class Prometheus:
    """A `prometheus` process of this test's own: its config, its storage in a tmp dir, on a loopback port."""

    def __init__(self, directory: Path, config: dict[str, Any]) -> None:
        config_file = directory / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(config))
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log_path = directory / "prometheus.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                ["prometheus", f"--config.file={config_file}", f"--storage.tsdb.path={directory / 'data'}",
                 f"--web.listen-address={self.url.removeprefix('http://')}"],
                cwd=directory, stdout=log, stderr=subprocess.STDOUT,
            )

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}:\n{self.log_path.read_text()}")
            try:
                if httpx.get(self.url + "/-/ready", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"prometheus not ready after {timeout} s:\n{self.log_path.read_text()}")

    def query(self, expr: str) -> dict[str, float]:
        """An instant query's answer: each series' pod label (or '' when it has none) -> its value."""
        reply = httpx.get(self.url + "/api/v1/query", params={"query": expr}, timeout=5).json()
        assert reply["status"] == "success", reply
        found = {r["metric"].get("pod", ""): float(r["value"][1]) for r in reply["data"]["result"]}
        assert len(found) == len(reply["data"]["result"]), f"more than one series per pod: {reply['data']}"
        return found

    def series(self, match: str) -> list[dict[str, str]]:
        reply = httpx.get(self.url + "/api/v1/series", params={"match[]": match}, timeout=5).json()
        assert reply["status"] == "success", reply
        return reply["data"]

    def rules(self) -> list[dict[str, Any]]:
        reply = httpx.get(self.url + "/api/v1/rules", timeout=5).json()
        return [rule for group in reply["data"]["groups"] for rule in group["rules"]]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[dict[str, Any]], Prometheus]]:
    """Start a ready Prometheus with a config: ``prometheus({...})``; stopped (by its PID) after the test."""
    started: list[Prometheus] = []

    def start(config: dict[str, Any]) -> Prometheus:
        directory = tmp_path / f"prometheus-{len(started)}"
        directory.mkdir()
        server = Prometheus(directory, config)
        started.append(server)
        server.wait_ready()
        return server

    yield start
    for server in started:
        server.stop()


def _eventually(what: str, probe: Callable[[], Any], expected: Any, until: Callable[[], bool]) -> None:
    """Poll ``probe`` until it returns ``expected``; fail, with the last answer, once ``until()`` is true."""
    last = None
    while True:
        last = probe()
        if last == expected:
            return
        if until():
            pytest.fail(f"{what}: expected {expected!r}, last read {last!r}")
        time.sleep(0.2)


def test_real_prometheus_reads_the_load_of_held_requests(start_server: Callable[..., Server],
                                                          prometheus: Callable[..., Prometheus],
                                                          tmp_path: Path) -> None:
    """Pod 1 (one worker) holds 3 requests, pod 2 (two workers) 2: the record reads 3 and 2, one series per pod
    (the worker label summed away), the KEDA query 5 and the Prometheus Adapter's query the same per pod; the
    canary Deployment, scraped from pod 1's server too, adds nothing. Once the requests end, all read 0."""
    _needs("prometheus")
    # Prometheus starts while the servers do: it first scrapes targets about 5 s after it starts
    one = start_server("limits.py:Limited", cwd=SERVICES, args=["--max-concurrency", "100"], ready=False)
    two = start_server("limits.py:Limited", cwd=SERVICES, args=["--max-concurrency", "100", "--workers", "2"],
                       ready=False)
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(yaml.safe_dump(rules("iris", "prod", timeout_s=10, interval="1s")))
    targets = [(one, POD_1), (two, POD_2), (one, CANARY)]
    prom = prometheus({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules_file)],
        "scrape_configs": [{
            "job_name": "bento_like",
            "static_configs": [
                # the labels Kubernetes pod discovery (relabelled) or a ServiceMonitor would attach
                {"targets": [server.url.removeprefix("http://")], "labels": {"namespace": "prod", "pod": pod}}
                for server, pod in targets
            ],
        }],
    })
    one.wait_ready()
    two.wait_ready()
    keda = keda_query("iris", "prod")
    adapter = _adapter_query("prod", [POD_1, POD_2])
    record = f'{LOAD_RECORD}{{namespace="prod"}}'
    idle = {"keda": {"": 0.0}, "record": {POD_1: 0.0, POD_2: 0.0}, "adapter": {POD_1: 0.0, POD_2: 0.0}}
    held = {"keda": {"": 5.0}, "record": {POD_1: 3.0, POD_2: 2.0}, "adapter": {POD_1: 3.0, POD_2: 2.0}}
    queries = {"keda": keda, "record": record, "adapter": adapter}

    started = time.monotonic()
    for key, expr in queries.items():  # scraped and recorded: every pod's series is there, at 0
        _eventually(f"{key} before any request", lambda: prom.query(expr), idle[key],
                    lambda: time.monotonic() > started + 30)

    with ThreadPoolExecutor(5) as pool:
        calls = [pool.submit(httpx.post, server.url + "/wait", json={"seconds": HOLD_S}, timeout=30)
                 for server in (one, one, one, two, two)]
        for key, expr in queries.items():
            _eventually(f"{key} while 5 requests are held", lambda: prom.query(expr), held[key],
                        lambda: all(c.done() for c in calls))
        assert [c.result().status_code for c in calls] == [200] * 5

    ended = time.monotonic()
    for key, expr in queries.items():
        _eventually(f"{key} after the requests ended", lambda: prom.query(expr), idle[key],
                    lambda: time.monotonic() > ended + 30)
    # the adapter discovers the metric from the series its rule asks for, and serves it under LOAD_METRIC
    adapter_rule, = adapter_rules()["rules"]
    discovered = {(s["__name__"], s["pod"]) for s in prom.series(adapter_rule["seriesQuery"])}
    assert {pod for name, pod in discovered if re.search(adapter_rule["name"]["matches"], name)} >= {POD_1, POD_2}
    assert adapter_rule["name"]["as"] == LOAD_METRIC
    # no pod of a service scraped reads 0, where the sum alone reads nothing
    assert prom.query(keda_query("other", "prod")) == {"": 0.0}
    assert prom.query(keda_query("other", "prod").removesuffix(" or vector(0)")) == {}
    assert {rule["name"]: rule["health"] for rule in prom.rules()} == {
        LOAD_RECORD: "ok", "BentoLikeHighErrorRatio": "ok", "BentoLikeHighLatency": "ok", "BentoLikePodNotReady": "ok",
    }
