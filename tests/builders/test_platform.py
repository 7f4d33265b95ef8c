"""A bento locked for linux/arm64: the manifest records its platform, and both containerize backends install
arm64 wheels and describe an arm64 image. Images are inspected, never run, so this works on any host."""

from __future__ import annotations

import gzip
import json
import tarfile
from pathlib import Path

import pytest

from bento_like.bentos import MANIFEST_FILE, BentoStore, read_manifest
from bento_like.builders.bento import BuildConfigError, build_bento, load_build_config
from bento_like.builders.containerize import containerize
from bento_like.builders.docker_backend import build_context, render_dockerfile
from bento_like.builders.oci import ImageError

SERVICE = '''
import bento_like as bl


@bl.service(name="echo")
class Echo:
    @bl.api
    def echo(self, text: str) -> str:
        return text
'''


@pytest.fixture(scope="module")
def oci_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for the module, so the arm64 wheels are installed once."""
    return tmp_path_factory.mktemp("oci-cache")


@pytest.fixture
def arm64_bento(tmp_path: Path, home: Path) -> str:
    project = tmp_path / "proj"
    project.mkdir()
    (project / "service.py").write_text(SERVICE)
    (project / "bentofile.yaml").write_text("service: service.py:Echo\npython: {platform: linux/arm64}\n")
    return build_bento(project).bento.tag


def native_libraries(names: list[str]) -> list[str]:
    return [n for n in names if n.endswith(".so") or ".so." in n]


def layer_names(layout: Path, digest: str) -> list[str]:
    with gzip.open(layout / "blobs" / "sha256" / digest.split(":")[1]) as raw, tarfile.open(fileobj=raw) as tar:
        return tar.getnames()


def test_the_manifest_records_the_platform(arm64_bento: str, tmp_path: Path) -> None:
    bento = BentoStore().get(arm64_bento)
    assert bento.info.platform == "linux/arm64"
    assert "linux/arm64" in (bento.path / bento.info.python.lock_file).read_text().splitlines()[0]
    # a manifest written before the field existed reads as the platform it was built for: linux/amd64
    old = tmp_path / "old"
    old.mkdir()
    text = (bento.path / MANIFEST_FILE).read_text()
    (old / MANIFEST_FILE).write_text("\n".join(line for line in text.splitlines() if not line.startswith("platform:")))
    assert read_manifest(old).platform == "linux/amd64"


def test_an_unknown_platform_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "bentofile.yaml").write_text("service: s.py:S\npython: {platform: linux/s390x}\n")
    with pytest.raises(BuildConfigError, match=r"python.platform: 'linux/s390x' is not supported; use one of "
                                               r"linux/amd64, linux/arm64"):
        load_build_config(tmp_path)


def test_daemonless_image_gets_arm64_wheels_and_config(arm64_bento: str, tiny_base, oci_cache: Path,
                                                       tmp_path: Path) -> None:
    out = tmp_path / "image"
    result = containerize(arm64_bento, base=tiny_base("linux/arm64"), output=out, cache_dir=oci_cache)
    config = json.loads((out / "blobs" / "sha256" / result.config_digest.split(":")[1]).read_bytes())
    assert (config["os"], config["architecture"]) == ("linux", "arm64")
    deps = next(layer for layer in result.layers if layer.comment == "python dependencies")
    libraries = native_libraries(layer_names(out, deps.digest))
    assert libraries, "the dependencies hold no native library at all"
    assert [n for n in libraries if "x86_64" in n or "x86-64" in n] == []
    assert any("aarch64" in n for n in libraries)


def test_a_base_for_another_platform_is_refused(arm64_bento: str, tiny_base, oci_cache: Path,
                                                tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=r"is an image for linux/amd64, not linux/arm64: use a base built for linux/arm64"):
        containerize(arm64_bento, base=tiny_base("linux/amd64"), output=tmp_path / "image", cache_dir=oci_cache)


def test_docker_backend_builds_for_the_bentos_platform(arm64_bento: str, oci_cache: Path, tmp_path: Path) -> None:
    bento = BentoStore().get(arm64_bento)
    dockerfile = render_dockerfile(bento, "127.0.0.1:5000/base:bookworm")
    assert "FROM --platform=linux/arm64 127.0.0.1:5000/base:bookworm" in dockerfile.splitlines()
    context = build_context(bento, tmp_path / "context", cache_dir=oci_cache)
    libraries = native_libraries([p.name for p in (context / "site-packages").rglob("*")])
    assert libraries and [n for n in libraries if "x86_64" in n or "x86-64" in n] == []
