"""Misuse of @service/@api fails at decoration or load time with a message that says what to change."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import re

import pytest

import bento_like as bl
from bento_like.sdk import get_spec
from bento_like.sdk.loader import load_service


def test_a_service_declares_its_apis_resources_and_traffic() -> None:
    @bl.service(name="demo", resources={"cpu": 2, "gpu": 1}, traffic={"timeout": 5, "max_concurrency": 8}, workers=2)
    class Demo:
        @bl.api
        def predict(self, x: np.ndarray) -> np.ndarray:
            return x

        @bl.api(route="/v1/tag", name="tagger", batchable=True, max_batch_size=16, max_latency_ms=5)
        def tag(self, items: list) -> list:
            return items

    spec = get_spec(Demo)
    assert spec.name == "demo" and spec.resources.gpu == 1 and spec.traffic.timeout == 5.0 and spec.workers == 2
    tagger = spec.api("tagger").config
    assert tagger.route == "/v1/tag" and tagger.batchable and tagger.max_batch_size == 16
    # methods stay plain methods
    assert Demo().predict(3) == 3


def test_batchable_api_with_two_parameters_is_refused() -> None:
    with pytest.raises(bl.ServiceDefinitionError, match="takes 2 parameters .x, y.*batchable=False"):

        class S:
            @bl.api(batchable=True)
            def f(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
                return x


def test_unknown_resource_and_traffic_keys_are_refused() -> None:
    with pytest.raises(bl.ServiceDefinitionError, match="unknown resources key.*'gpus'.*allowed: cpu, gpu"):

        @bl.service(resources={"gpus": 1})
        class A:
            @bl.api
            def f(self) -> int:
                return 1

    with pytest.raises(bl.ServiceDefinitionError, match="unknown traffic key.*'timout'"):

        @bl.service(traffic={"timout": 1})
        class B:
            @bl.api
            def f(self) -> int:
                return 1


def test_duplicate_route_is_refused_naming_both_methods() -> None:
    with pytest.raises(bl.ServiceDefinitionError, match="route '/x' is declared by both 'a' and 'b'"):

        @bl.service
        class S:
            @bl.api(route="/x")
            def a(self) -> int:
                return 1

            @bl.api(route="/x")
            def b(self) -> int:
                return 2


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"max_batch_size": 0}, "max_batch_size must be an int >= 1"),
        ({"max_latency_ms": -1}, "max_latency_ms must be > 0"),
        ({"batch_dim": -1}, "batch_dim must be"),
        ({"route": "nope"}, "route must start with '/'"),
        ({"preferred_batch_sizes": [128]}, "preferred_batch_sizes"),
    ],
)
def test_bad_api_options(kwargs, words) -> None:
    with pytest.raises(bl.ServiceDefinitionError, match=words):

        class S:
            @bl.api(**kwargs)
            def f(self, x: int) -> int:
                return x


def test_reserved_routes_varargs_and_empty_services() -> None:
    with pytest.raises(bl.ServiceDefinitionError, match="reserved"):

        @bl.service
        class A:
            @bl.api(route="/metrics")
            def f(self) -> int:
                return 1

    with pytest.raises(bl.ServiceDefinitionError, match=r"\*\*kw"):

        class B:
            @bl.api
            def f(self, **kw: int) -> int:
                return 1

    with pytest.raises(bl.ServiceDefinitionError, match="declares no API"):

        @bl.service
        class C:
            pass


def test_depends_needs_a_service() -> None:
    with pytest.raises(bl.ServiceDefinitionError, match="depends.. takes a class decorated with @bento_like.service"):
        bl.depends(int)


def test_loader_finds_services_by_file_or_module(tmp_path: Path) -> None:
    (tmp_path / "two.py").write_text(
        "import bento_like as bl\n"
        "@bl.service\nclass A:\n    @bl.api\n    def f(self) -> int:\n        return 1\n"
        "@bl.service\nclass B:\n    @bl.api\n    def f(self) -> int:\n        return 2\n"
    )
    assert load_service("two.py:B", tmp_path).name == "B"
    with pytest.raises(bl.ServiceDefinitionError, match="defines 2 services .A, B.; name one as two.py:ClassName"):
        load_service("two.py", tmp_path)
    with pytest.raises(bl.ServiceDefinitionError, match="has no attribute 'C'"):
        load_service("two.py:C", tmp_path)
    with pytest.raises(bl.ServiceDefinitionError, match="no such module"):
        load_service("not_a_module_anywhere:X", tmp_path)


def test_unresolvable_annotation_fails_at_load(tmp_path: Path) -> None:
    from bento_like.serving import create_app

    (tmp_path / "fwd.py").write_text(
        "from __future__ import annotations\nimport bento_like as bl\n"
        "@bl.service\nclass S:\n    @bl.api\n    def f(self, x: Missing) -> int:\n        return 1\n"
    )
    spec = load_service("fwd.py:S", tmp_path)
    with pytest.raises(bl.ServiceDefinitionError, match="API 'f': cannot resolve its type annotations.*Missing"):
        create_app(spec)


@pytest.mark.parametrize("given, cpu, memory, gpu", [
    ({"cpu": "200m", "memory": "2Gi", "gpu": "1"}, 0.2, "2Gi", 1),  # as Kubernetes (and BentoML) write them
    ({"cpu": "2", "memory": "512M"}, 2.0, "512M", 0),
    ({"cpu": 1.5, "memory": 1073741824}, 1.5, "1073741824", 0),
    ({"cpu": ".5", "memory": "1e9", "gpu": 2}, 0.5, "1e9", 2),
])
def test_resources_take_numbers_and_kubernetes_quantities(given: dict, cpu: float, memory: str, gpu: int) -> None:
    @bl.service(resources=given)
    class Svc:
        @bl.api
        def f(self, x: int) -> int:
            return x

    resources = get_spec(Svc).resources
    assert (resources.cpu, resources.memory, resources.gpu) == (cpu, memory, gpu)


@pytest.mark.parametrize("given, message", [
    ({"cpu": "two"}, "resources.cpu must be a number of cores or a quantity such as \"500m\""),
    ({"cpu": "0m"}, "resources.cpu must be a number > 0, got 0.0"),
    ({"gpu": "0.5"}, "resources.gpu must be a whole number of GPUs >= 0"),
    ({"gpu": True}, "resources.gpu must be a whole number of GPUs >= 0"),
    ({"memory": "2 gigs"}, "resources.memory must be bytes or a quantity such as \"512Mi\""),
    ({"memory": "2GB"}, "resources.memory must be bytes or a quantity"),
])
def test_a_resource_it_cannot_read_is_refused_naming_it(given: dict, message: str) -> None:
    with pytest.raises(bl.ServiceDefinitionError, match=re.escape(message)):
        @bl.service(resources=given)
        class Svc:
            @bl.api
            def f(self, x: int) -> int:
                return x
