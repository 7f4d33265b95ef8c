"""`pkg models pull`: a modelcar (pkg containerize --model-only) pushed to a real registry, pulled into an empty
model store; hostile layers and tampered models pushed by hand are refused and leave the store as it was; and a
server started with --watch-models swaps in the new version that `pkg models pull --watch` brings."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import httpx
import pytest
from click.testing import CliRunner

import bento_like as bl
from bento_like.bentos import BentoStore
from bento_like.builders._oci_layout import (
    MEDIA_CONFIG,
    MEDIA_INDEX,
    MEDIA_LAYER_GZIP,
    MEDIA_MANIFEST,
    ImageError,
    Layout,
    canonical_json,
)
from bento_like.builders.bento import build_bento
from bento_like.builders.modelcar import containerize_models
from bento_like.builders.models_pull import ModelcarError, pull_models, watch_models
from bento_like.builders.registry import push_image
from bento_like.cli.main import cli
from bento_like.models import ModelStore

SERVICE = '''
import numpy as np
import bento_like as bl


@bl.service(name="affine")
class Affine:
    scale = bl.model("scale:latest")
    offset = bl.model("offset:latest")

    @bl.api
    def predict(self, x: np.ndarray) -> np.ndarray:
        return x * self.scale["factor"] + self.offset["add"]
'''


@pytest.fixture(scope="module")
def module_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One BENTO_LIKE_HOME for the module: a bento build takes seconds."""
    path = tmp_path_factory.mktemp("pull-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BENTO_LIKE_HOME", str(path))
        yield path


def build(root: Path) -> str:
    """A bento of SERVICE with the store's latest scale and offset."""
    root.mkdir()
    (root / "service.py").write_text(SERVICE)
    (root / "bentofile.yaml").write_text("service: service.py:Affine\n")
    return build_bento(root).bento.tag


@pytest.fixture(scope="module")
def bento(module_home: Path) -> str:
    bl.models.save("scale", {"factor": 3.0}, framework="pickle")
    bl.models.save("offset", {"add": 1.0}, framework="pickle")
    return build(module_home / "affine")


def modelcar(bento: str, out: Path) -> tuple[Path, str]:
    """The bento's modelcar on no base (KServe's native mode): (layout, tag)."""
    image = containerize_models(bento, base="scratch", output=out)
    return image.layout, image.tag


@pytest.fixture(scope="module")
def pushed(bento: str, registry, tmp_path_factory: pytest.TempPathFactory) -> str:
    layout, tag = modelcar(bento, tmp_path_factory.mktemp("modelcar"))
    reference = f"{registry.host}/t/pull-affine:models"
    push_image(layout, reference, source_tag=tag)
    return reference


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ModelStore:
    """An empty store the CLI uses too (BENTO_LIKE_MODEL_STORE)."""
    monkeypatch.setenv("BENTO_LIKE_MODEL_STORE", str(tmp_path / "store"))
    return ModelStore(tmp_path / "store")


def bento_models(tag: str) -> list[str]:
    return sorted({m.tag for m in BentoStore().get(tag).info.models})


def unchanged(store: ModelStore) -> None:
    """Nothing in the store: no model, no staging or download directory left behind."""
    assert store.tags() == []
    left = sorted(str(p.relative_to(store.root)) for p in store.root.rglob("*")) if store.root.exists() else []
    assert left in ([], [".tmp"]), left


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.05)


def test_pull_adds_exactly_the_bento_s_models_once(bento: str, pushed: str, store: ModelStore) -> None:
    refused = CliRunner().invoke(cli, ["models", "pull", pushed])
    assert refused.exit_code == 1 and "unpickles files" in refused.output and "--trust" in refused.output
    unchanged(store)

    first = CliRunner().invoke(cli, ["models", "pull", pushed, "--trust"])
    assert first.exit_code == 0, first.output
    models = bento_models(bento)
    assert [line.removeprefix("added ") for line in first.stdout.splitlines()[:-1]] == models
    assert first.stdout.splitlines()[-1].startswith(f"{pushed}@sha256:") and "2 added, 0 already there" in first.stdout
    assert sorted(store.tags()) == models
    scale = next(tag for tag in models if tag.startswith("scale:"))
    assert store.get(scale).load() == {"factor": 3.0}  # verified on load: files, digest, version
    assert store.get("scale:latest").tag == scale

    again = CliRunner().invoke(cli, ["models", "pull", pushed, "--trust", "-o", "json"])
    assert again.exit_code == 0, again.output
    document = json.loads(again.stdout)
    assert document["added"] == [] and document["existing"] == models and document["bytes_downloaded"] == 0


def test_not_a_modelcar_is_named(registry, busybox_image, store: ModelStore) -> None:
    reference = f"{registry.host}/t/pull-busybox:v1"
    push_image(busybox_image.layout, reference, source_tag=busybox_image.tag)
    with pytest.raises(ModelcarError, match=r"pull-busybox:v1 is not a modelcar: its manifest has no "
                                            r"dev\.bento_like\.models annotation"):
        pull_models(reference, trust=True)
    unchanged(store)


def test_an_index_is_resolved_to_the_platform_s_image(bento: str, pushed: str, registry, store: ModelStore) -> None:
    single = httpx.get(f"http://{registry.host}/v2/t/pull-affine/manifests/models",
                       headers={"Accept": MEDIA_MANIFEST})
    index = canonical_json({"schemaVersion": 2, "mediaType": MEDIA_INDEX, "manifests": [
        {"mediaType": MEDIA_MANIFEST, "digest": single.headers["Docker-Content-Digest"],
         "size": len(single.content), "platform": {"os": "linux", "architecture": "amd64"}}]})
    put = httpx.put(f"http://{registry.host}/v2/t/pull-affine/manifests/multi", content=index,
                    headers={"Content-Type": MEDIA_INDEX})
    assert put.status_code == 201, put.text
    with pytest.raises(ImageError, match=r"no image for linux/arm64 \(offered: linux/amd64\)"):
        pull_models(f"{registry.host}/t/pull-affine:multi", trust=True, platform="linux/arm64")
    unchanged(store)
    report = pull_models(f"{registry.host}/t/pull-affine:multi", trust=True, platform="linux/amd64")
    assert report.added == bento_models(bento) and report.digest == "sha256:" + hashlib.sha256(index).hexdigest()


def test_watch_outlives_a_registry_that_is_down(start_registry, store: ModelStore) -> None:
    registry = start_registry()
    registry.stop()  # nothing listens there now
    lines: list[str] = []
    stop = threading.Event()
    watcher = threading.Thread(target=watch_models, args=(f"{registry.host}/t/gone:v1",),
                               kwargs={"interval": 0.05, "stop": stop, "report": lines.append})
    watcher.start()
    wait_for(lambda: len(lines) >= 2, "second failed poll")
    stop.set()
    watcher.join(30)
    assert not watcher.is_alive()
    assert all("ConnectError" in line and line.endswith("trying again in 0.05 s") for line in lines), lines
    unchanged(store)


# --- hand-made images -----------------------------------------------------------------------------------------


def members_of(layer: bytes) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(layer))) as tar:
        return [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar]  # type: ignore[union-attr]


def tar_gz(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for member, data in members:
            tar.addfile(member, io.BytesIO(data) if data is not None else None)
    return gzip.compress(raw.getvalue(), mtime=0)


def push_by_hand(registry, tmp_path: Path, repository: str, layers: list[bytes], models: str) -> str:
    """An image of these layer blobs whose manifest names `models`, pushed as it is: no builder checks it."""
    layout = Layout.init(tmp_path / f"hand-{repository.replace('/', '-')}")
    descriptors = [dict(zip(("digest", "size"), layout.write_blob(blob)), mediaType=MEDIA_LAYER_GZIP)
                   for blob in layers]
    config = {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [
        "sha256:" + hashlib.sha256(gzip.decompress(b) if b[:2] == b"\x1f\x8b" else b).hexdigest()
        for b in layers]}}
    config_digest, config_size = layout.write_blob(canonical_json(config))
    manifest = {"schemaVersion": 2, "mediaType": MEDIA_MANIFEST,
                "config": {"mediaType": MEDIA_CONFIG, "digest": config_digest, "size": config_size},
                "layers": descriptors,
                "annotations": {"dev.bento_like.models": models, "dev.bento_like.models_root": "/models"}}
    digest, size = layout.write_blob(canonical_json(manifest))
    layout.set_tag("v1", {"mediaType": MEDIA_MANIFEST, "digest": digest, "size": size})
    reference = f"{registry.host}/{repository}:v1"
    push_image(layout.root, reference, source_tag="v1")
    return reference


@pytest.fixture(scope="module")
def genuine(bento: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, bytes]:
    """(tag, layer blob) of the scale model as the modelcar holds it."""
    layout, tag = modelcar(bento, tmp_path_factory.mktemp("genuine"))
    manifest = json.loads(Layout(layout).read_blob(Layout(layout).resolve(tag)["digest"]))
    scale = next(t for t in bento_models(bento) if t.startswith("scale:"))
    layers = [Layout(layout).read_blob(layer["digest"]) for layer in manifest["layers"]]
    return scale, next(layer for layer in layers if any(m.name.endswith("/manifest.yaml") and scale.replace(
        ":", "/") in m.name for m, _ in members_of(layer)))


def entry(name: str, data: bytes | None = b"x", **fields: object) -> tuple[tarfile.TarInfo, bytes | None]:
    member = tarfile.TarInfo(name)
    member.size = len(data) if data is not None else 0
    for key, value in fields.items():
        setattr(member, key, value)
    return member, data


def hostile_cases(tag: str, layer: list[tuple[tarfile.TarInfo, bytes | None]]) -> dict[str, tuple[list, str]]:
    """name -> (members, what the error must say)."""
    model_dir = f"models/{tag.replace(':', '/')}"
    weights = next(i for i, (m, _) in enumerate(layer) if m.isfile() and not m.name.endswith("manifest.yaml"))
    tampered = list(layer)
    member, data = tampered[weights]
    tampered[weights] = (member, bytes([data[0] ^ 1]) + data[1:])  # type: ignore[index]
    return {
        "dot-dot": ([*layer, entry(f"{model_dir}/../../../etc/evil")], r"/\.\./\.\./etc/evil' points outside"),
        "absolute": ([*layer, entry("/etc/evil")], r"member '/etc/evil' is outside /models"),
        "outside": ([*layer, entry("etc/evil")], r"member 'etc/evil' is outside /models"),
        "symlink": ([*layer, entry(f"{model_dir}/link", None, type=tarfile.SYMTYPE, linkname="/etc/passwd")],
                    r"is a link to '/etc/passwd'"),
        "device": ([*layer, entry(f"{model_dir}/null", None, type=tarfile.CHRTYPE, devmajor=1, devminor=3)],
                   r"device, fifo or other special file"),
        "tampered": (tampered, r"does not match the manifest's size and sha256"),
        "unlisted": ([*layer, entry(f"{model_dir}/extra.bin")], r"is not in the manifest"),
    }


def test_hostile_layers_and_tampered_models_are_refused_leaving_the_store_as_it_was(
        genuine: tuple[str, bytes], registry, tmp_path: Path, store: ModelStore) -> None:
    tag, blob = genuine
    layer = members_of(blob)
    # the genuine layer, pushed by hand under a junk base layer: pulled, and the junk is never fetched
    ok = push_by_hand(registry, tmp_path, "t/hand-genuine", [b"not a tar at all", blob], tag)
    report = pull_models(ok, ModelStore(tmp_path / "other"), trust=True)
    assert report.added == [tag] and report.bytes_downloaded == len(blob)
    for case, (members, message) in hostile_cases(tag, layer).items():
        reference = push_by_hand(registry, tmp_path, f"t/hand-{case}", [tar_gz(members)], tag)
        with pytest.raises(ModelcarError, match=message):
            pull_models(reference, trust=True)
        unchanged(store)
    # the image must name the model its layer holds
    liar = push_by_hand(registry, tmp_path, "t/hand-liar", [blob], "offset:0123456789abcdef")
    with pytest.raises(ModelcarError, match=rf"holds {tag}, not offset:0123456789abcdef as the image says"):
        pull_models(liar, trust=True)
    unchanged(store)


# --- watch mode end to end ------------------------------------------------------------------------------------

WATCHED = '''
import numpy as np
import bento_like as bl


@bl.service(name="scaler")
class Scaler:
    scale = bl.model("scale:latest")

    @bl.api
    def predict(self, x: np.ndarray) -> np.ndarray:
        return x * self.scale["factor"]
'''


def test_a_server_watching_the_store_swaps_in_what_pull_watch_brings(
        bento: str, registry, store: ModelStore, module_home: Path, tmp_path: Path,
        start_server: Callable) -> None:
    reference = f"{registry.host}/t/pull-watched:models"
    layout, tag = modelcar(bento, tmp_path / "v1")
    push_image(layout, reference, source_tag=tag)
    assert pull_models(reference, trust=True).added == bento_models(bento)
    old = store.get("scale:latest").version

    service = tmp_path / "scaler"
    service.mkdir()
    (service / "service.py").write_text(WATCHED)
    env = {"BENTO_LIKE_MODEL_STORE": str(store.root), "BENTO_LIKE_WATCH_MODELS_S": "0.2"}
    server = start_server("service.py:Scaler", cwd=service, args=["--watch-models"], env=env)
    watch_log = open(tmp_path / "watch.log", "wb")
    watcher = subprocess.Popen([sys.executable, "-m", "bento_like", "models", "pull", reference, "--watch", "0.2",
                                "--trust"], env={**os.environ, **env}, stdout=watch_log, stderr=subprocess.STDOUT)
    try:
        with httpx.Client(base_url=server.url, timeout=10) as client:
            def call() -> str:
                answer = client.post("/predict", json={"x": [1.0]})
                assert answer.status_code == 200, answer.text
                return answer.headers["x-model-version"]

            assert call() == f"scale:{old}"
            wait_for(lambda: "nothing new" in (tmp_path / "watch.log").read_text(), "the watcher's first poll")
            # a new version of the model, in a new bento's modelcar (built from the home's store, not the
            # served one), pushed to the same tag
            with pytest.MonkeyPatch.context() as patch:
                patch.delenv("BENTO_LIKE_MODEL_STORE")
                bl.models.save("scale", {"factor": 5.0}, framework="pickle")
                newer = build(module_home / f"affine-{time.monotonic_ns()}")
            assert store.get("scale:latest").version == old
            new = next(t for t in bento_models(newer) if t.startswith("scale:"))
            assert new != f"scale:{old}"
            layout, tag = modelcar(newer, tmp_path / "v2")
            push_image(layout, reference, source_tag=tag)
            seen, deadline = [], time.monotonic() + 60
            while time.monotonic() < deadline and (not seen or seen[-1] != new):
                seen.append(call())  # every answer a 200, before, during and after the swap
                time.sleep(0.02)
            assert seen[-1] == new, (seen[-5:], (tmp_path / "watch.log").read_text(), server.log()[-3000:])
            assert set(seen) <= {f"scale:{old}", new}
            assert client.post("/predict", json={"x": [1.0]}).json() == [5.0]
        watcher.terminate()
        assert watcher.wait(30) == 0
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait()
        watch_log.close()
    lines = (tmp_path / "watch.log").read_text()
    assert f"added {new} from {reference}@sha256:" in lines, lines
    assert "scale:latest now resolves to" in server.log()
