"""Prometheus metrics kept in plain dicts: cheap enough to update on every request.

Each worker process keeps its own values; with ``--workers N`` every sample carries a ``worker`` label, and
each worker publishes its samples to a directory the supervisor made (``ServeOptions.metrics_dir``) about once a
second, so whichever worker a scrape reaches answers for all of them (the others' samples at most a second old).
"""

from __future__ import annotations

import bisect
import json
import math
import os
from pathlib import Path
from typing import Callable, Iterable

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.1, 0.125,
    0.15, 0.175, 0.2, 0.225, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 30.0, 60.0,
)  # fine between 10 and 250 ms, where batching latency bounds (max_latency_ms plus a batch) usually lie


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    # an empty value is no label to Prometheus: left out (a service without models has no model version)
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values) if v != ""]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _num(v: float) -> str:
    if v == math.inf:
        return "+Inf"
    return str(int(v)) if float(v).is_integer() and abs(v) < 1e15 else repr(float(v))


class Counter:
    kind = "counter"

    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()) -> None:
        self.name, self.help, self.label_names = name, help, labels
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, labels: tuple[str, ...] = (), amount: float = 1.0) -> None:
        self.values[labels] = self.values.get(labels, 0.0) + amount

    def samples(self, const: tuple[tuple[str, str], ...]) -> Iterable[str]:
        names = self.label_names + tuple(n for n, _ in const)
        for labels, value in sorted(self.values.items()):
            yield f"{self.name}{_labels(names, labels + tuple(v for _, v in const))} {_num(value)}"


class Gauge(Counter):
    """A gauge whose values may be read at scrape time from ``collect`` instead of being set on the hot path."""

    kind = "gauge"

    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()) -> None:
        super().__init__(name, help, labels)
        self.collect: Callable[[], dict[tuple[str, ...], float]] | None = None

    def set(self, labels: tuple[str, ...], value: float) -> None:
        self.values[labels] = value

    def samples(self, const: tuple[tuple[str, str], ...]) -> Iterable[str]:
        if self.collect is not None:
            self.values = dict(self.collect())
        return super().samples(const)


class Histogram:
    kind = "histogram"

    def __init__(self, name: str, help: str, labels: tuple[str, ...] = (), buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.name, self.help, self.label_names = name, help, labels
        self.buckets = tuple(buckets)
        self.values: dict[tuple[str, ...], list[float]] = {}

    def observe(self, labels: tuple[str, ...], value: float) -> None:
        row = self.values.get(labels)
        if row is None:
            # per-bucket counts (non-cumulative), then +Inf, then sum
            row = self.values[labels] = [0.0] * (len(self.buckets) + 2)
        row[bisect.bisect_left(self.buckets, value)] += 1
        row[-1] += value

    def samples(self, const: tuple[tuple[str, str], ...]) -> Iterable[str]:
        names = self.label_names + tuple(n for n, _ in const)
        for labels, row in sorted(self.values.items()):
            values = labels + tuple(v for _, v in const)
            running = 0.0
            for bound, count in zip(self.buckets + (math.inf,), row[:-1]):
                running += count
                le = 'le="' + _num(bound) + '"'
                yield f"{self.name}_bucket{_labels(names, values, le)} {_num(running)}"
            yield f"{self.name}_sum{_labels(names, values)} {repr(row[-1])}"
            yield f"{self.name}_count{_labels(names, values)} {_num(running)}"


class Registry:
    """The metrics of one server process."""

    def __init__(self, const_labels: dict[str, str] | None = None) -> None:
        self.const = tuple(sorted((const_labels or {}).items()))
        self.metrics: list[Counter | Histogram] = []
        self.requests = self.add(
            Counter("bento_like_requests_total", "HTTP requests answered, by API, status code and model version",
                    ("api", "status", "version"))
        )
        self.latency = self.add(
            Histogram(
                "bento_like_request_duration_seconds",
                "Time from request start to response, by API, status code and model version",
                ("api", "status", "version"),
            )
        )
        self.in_flight = self.add(Gauge("bento_like_requests_in_flight", "Requests being handled now, by API", ("api",)))
        self.ready = self.add(
            Gauge("bento_like_ready", "1 while /readyz answers 200; 0 while starting, blocked, degraded or stopping")
        )
        self.rejections = self.add(
            Counter(
                "bento_like_rejections_total",
                "Requests refused or dropped before running, by API and reason "
                "(overload, queue_full, latency, deadline, not_ready, timeout, disconnected)",
                ("api", "reason"),
            )
        )
        self.queue_depth = self.add(Gauge("bento_like_queue_depth", "Requests waiting in a batch queue, by API", ("api",)))
        self.loop_lag = self.add(
            Gauge(
                "bento_like_event_loop_lag_seconds",
                "How late the event loop runs a timer (moving average): what every request also waits, to be read "
                "and to be answered, while the loop is busy",
            )
        )
        self.abandoned_calls = self.add(
            Gauge(
                "bento_like_abandoned_calls",
                "Sync calls still running on an instance's request threads after their request gave up (deadline "
                "passed or client gone), by instance: each holds a thread until it returns",
                ("instance",),
            )
        )
        self.batch_size = self.add(
            Histogram("bento_like_batch_size", "Items per executed batch, by API", ("api",), BATCH_BUCKETS)
        )
        self.queue_wait = self.add(
            Histogram("bento_like_queue_wait_seconds", "Time a request waited in the batch queue, by API", ("api",))
        )
        self.execution = self.add(
            Histogram("bento_like_batch_execution_seconds", "Time one batch ran on an instance, by API", ("api",))
        )
        self.tasks = self.add(
            Counter("bento_like_tasks_total", "Tasks that ended in this process, by API and status (completed, "
                    "failed, canceled)", ("api", "status"))
        )
        self.tasks_held = self.add(
            Gauge("bento_like_tasks", "Tasks held by this process now, by API and status (pending, in_progress)",
                  ("api", "status"))
        )

    def add(self, metric):  # type: ignore[no-untyped-def]
        self.metrics.append(metric)
        return metric

    def families(self) -> dict[str, list[str]]:
        """Metric name -> its sample lines, now."""
        return {m.name: list(m.samples(self.const)) for m in self.metrics}

    def render(self, others: Iterable[dict[str, list[str]]] = ()) -> str:
        """The Prometheus text of this process, with other workers' samples (from ``others``) grouped in."""
        merged = self.families()
        for family in others:
            for name, lines in family.items():
                if name in merged:
                    merged[name].extend(lines)
        out: list[str] = []
        for m in self.metrics:
            out.append(f"# HELP {m.name} {m.help}")
            out.append(f"# TYPE {m.name} {m.kind}")
            out.extend(merged[m.name])
        return "\n".join(out) + "\n"


def publish(registry: Registry, directory: Path, worker: str) -> None:
    """Write this worker's samples where the other workers read them (atomically: write, then rename)."""
    target = directory / f"worker-{worker}.json"
    scratch = directory / f".worker-{worker}.{os.getpid()}.tmp"
    scratch.write_text(json.dumps(registry.families()))
    os.replace(scratch, target)


def published(directory: Path, worker: str) -> list[dict[str, list[str]]]:
    """The samples the other workers published last (a worker that never published is absent)."""
    found = []
    for path in sorted(directory.glob("worker-*.json")):
        if path.name == f"worker-{worker}.json":
            continue
        try:
            found.append(json.loads(path.read_text()))
        except (OSError, ValueError):  # replaced or removed while reading: skip it this time
            continue
    return found
