"""`pkg containerize --model-only` (a KServe modelcar) and `pkg serve BENTO --models DIR`: the models image is
checked with skopeo and umoci, pushed to a real registry, and run with runc the way KServe runs it (its own
arguments, the pod's process namespace, an emptyDir at /mnt) beside a real server that reads the models from it."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Callable, Iterator

import httpx
import pytest
from click.testing import CliRunner

import bento_like as bl
from bento_like.bentos import BentoStore
from bento_like.builders.base import BaseImageError
from bento_like.builders.bento import build_bento
from bento_like.builders.containerize import (
    MODELCAR_MOUNT,
    MODELS_DIR_ENV,
    ContainerizeError,
    containerize,
    shipped_manifests,
    store_image_dir,
)
from bento_like.builders.modelcar import containerize_models
from bento_like.builders.oci import ImageConfig, LayerSpec, build_image
from bento_like.cli.main import cli

from live_server import free_port


def require(*binaries: str) -> None:
    """Skip naming what to install (conftest.py's own helper is not importable by name in a whole-suite run)."""
    missing = [b for b in binaries if shutil.which(b) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (apt-get install skopeo umoci runc)")


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

# What KServe's storage initializer gives the modelcar container (pkg/utils/storage.go, modelcarCommand): `$$$$`
# there is `$$` after Kubernetes' own `$$` escape, the shell's pid.
KSERVE_MODELCAR_ARGS = ["sh", "-c", "ln -sf /proc/$$/root/models /mnt/models && sleep infinity"]


@pytest.fixture(scope="module")
def module_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One BENTO_LIKE_HOME for the module: a bento build (its lock above all) takes seconds, and no test here
    changes the bentos it builds."""
    path = tmp_path_factory.mktemp("modelcar-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BENTO_LIKE_HOME", str(path))
        yield path


def build(root: Path, service: str, bentofile: str) -> str:
    root.mkdir()
    (root / "service.py").write_text(service)
    (root / "bentofile.yaml").write_text(bentofile)
    return build_bento(root).bento.tag


@pytest.fixture(scope="module")
def bento(module_home: Path) -> str:
    bl.models.save("scale", {"factor": 3.0}, framework="pickle")
    bl.models.save("offset", {"add": 1.0}, framework="pickle")
    return build(module_home / "affine", SERVICE, "service: service.py:Affine\nlabels: {team: fraud}\n")


@pytest.fixture
def shell_base(tmp_path: Path) -> str:
    """`oci:DIR:base` of a static busybox with the applets KServe's modelcar arguments run (sh, ln, sleep, ls)."""
    busybox = Path("/bin/busybox")
    if not busybox.is_file():
        pytest.skip("needs a static /bin/busybox (apt-get install busybox-static)")
    root = tmp_path / "busybox-root"
    (root / "bin").mkdir(parents=True)
    shutil.copy(busybox, root / "bin" / "busybox")
    for applet in ("sh", "ln", "sleep", "ls", "mkdir"):
        (root / "bin" / applet).symlink_to("busybox")
    layout = tmp_path / "busybox-base"
    # an entrypoint and a command, as bases have: KServe's arguments must not end up behind them
    config = ImageConfig(entrypoint=["/bin/sh", "-c"], cmd=["exec sh"], user=None, env={"PATH": "/bin"},
                         platform="linux/amd64")
    build_image(None, [LayerSpec.directory(root, "/", comment="busybox")], config, layout, "base")
    return f"oci:{layout}:base"


def blob(layout: Path, digest: str) -> Path:
    return layout / "blobs" / "sha256" / digest.split(":")[1]


def layer_members(layout: Path, digest: str) -> dict[str, tuple[tarfile.TarInfo, bytes | None]]:
    with gzip.open(blob(layout, digest)) as raw, tarfile.open(fileobj=raw) as tar:
        return {m.name: (m, tar.extractfile(m).read() if m.isfile() else None) for m in tar}  # type: ignore[union-attr]


def expected_files(tag: str) -> dict[str, bytes]:
    """What /models must hold: each model's files as the bento has them, its manifest as images ship it."""
    bento = BentoStore().get(tag)
    manifests = shipped_manifests(bento, int(os.environ.get("SOURCE_DATE_EPOCH") or 0))
    files = {}
    for path in sorted((bento.path / "models").rglob("*")):
        if path.is_file():
            relative = path.relative_to(bento.path).as_posix()
            files[relative] = manifests.get(relative, path.read_bytes())
    return files


def test_model_only_image_holds_the_models_and_nothing_else(bento: str, shell_base: str, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    require("skopeo", "umoci")
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    result = containerize_models(bento, base=shell_base, output=tmp_path / "a", cache_dir=tmp_path / "cache-a")
    layout = tmp_path / "a"
    assert result.tag == f"{bento.split(':')[1]}-models"
    models = sorted(entry.tag for entry in BentoStore().get(bento).info.models)
    assert [(layer.comment, layer.source) for layer in result.layers] == [
        ("base", "base"), *((f"model {tag}", "built") for tag in models)]

    # each model in a layer of its own, under /models/<name>/<version>/, with exactly the bento's bytes
    found: dict[str, bytes] = {}
    for layer, tag in zip(result.layers[1:], models):
        members = layer_members(layout, layer.digest)
        model_dir = f"models/{tag.replace(':', '/')}"
        parents = {"models", model_dir.rsplit("/", 1)[0], model_dir}
        assert all(name in parents or name.startswith(model_dir + "/") for name in members), sorted(members)
        for name, (info, data) in members.items():
            assert info.uid == info.gid == 0 and info.mode & 0o444 == 0o444, (name, oct(info.mode))  # any uid reads
            if info.isdir():
                assert info.mode & 0o111 == 0o111, name
            else:
                assert info.isfile(), name
                found[name] = data  # type: ignore[assignment]
    assert found == expected_files(bento)  # no code, no site-packages, no bento.yaml: the models alone

    config = json.loads(blob(layout, result.config_digest).read_text())
    assert config["config"]["User"] == "10001:10001"  # the serving image's: its /proc/<pid>/root is readable
    assert not config["config"].get("Entrypoint") and "Cmd" not in config["config"]
    manifest = json.loads(blob(layout, result.manifest_digest).read_text())
    assert manifest["annotations"]["dev.bento_like.bento"] == bento
    assert manifest["annotations"]["dev.bento_like.models"] == ",".join(models)

    inspect = json.loads(subprocess.run(["skopeo", "inspect", f"oci:{layout}:{result.tag}"], capture_output=True,
                                        text=True, check=True).stdout)
    assert inspect["Digest"] == result.manifest_digest and inspect["Architecture"] == "amd64"
    subprocess.run(["umoci", "stat", "--image", f"{layout}:{result.tag}"], check=True, capture_output=True)

    # the same bento and epoch, built from nothing cached: the same bytes
    again = containerize_models(bento, base=shell_base, output=tmp_path / "b", cache_dir=tmp_path / "cache-b")
    assert [layer.source for layer in again.layers[1:]] == ["built", "built"]
    assert again.manifest_digest == result.manifest_digest


def test_cli_builds_beside_the_serving_image_and_pushes(bento: str, shell_base: str, registry,
                                                        repo_name: str) -> None:
    require("skopeo")
    dest = f"{registry.host}/{repo_name}:models"
    built = CliRunner().invoke(cli, ["containerize", bento, "--model-only", "--base", shell_base, "--push", dest,
                                     "-o", "json"])
    assert built.exit_code == 0, built.output
    document = json.loads(built.stdout)
    name, version = bento.split(":")
    # the bento's own layout, under a tag that is not the serving image's
    assert document["layout"] == str(store_image_dir(name)) and document["tag"] == f"{version}-models"
    assert document["push"]["digest"] == document["digest"] and document["push"]["reference"].endswith(dest)
    remote = json.loads(subprocess.run(["skopeo", "inspect", "--tls-verify=false", f"docker://{dest}"],
                                       capture_output=True, text=True, check=True).stdout)
    assert remote["Digest"] == document["digest"]
    assert remote["Labels"]["org.opencontainers.image.version"] == version

    # pkg deploy checks that the registry holds both images, each built from this bento (any image of the
    # bento stands in for the serving one here: the check reads the manifest's annotation, not the layers)
    from bento_like.builders.deploy import DeployError, render_bento
    from bento_like.builders.registry import push_image

    serving = f"{registry.host}/{repo_name}:serving"
    push_image(Path(document["layout"]), serving, source_tag=document["tag"])
    rendered = render_bento(bento, serving, target="kserve", model_image=dest)
    container = rendered.documents[0]["spec"]["predictor"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["STORAGE_URI"] == f"oci://{dest}" and env["BENTO_LIKE_MODELS_DIR"] == "/mnt/models"
    with pytest.raises(DeployError, match="--model-only --push"):
        render_bento(bento, serving, target="kserve", model_image=f"{registry.host}/{repo_name}:absent")


def test_refused_without_models_or_without_a_shell(bento: str, tiny_base: Callable[[str], str], tmp_path: Path) -> None:
    bare = build(tmp_path / "bare", "import bento_like as bl\n\n\n@bl.service(name='bare')\nclass Bare:\n"
                 "    @bl.api\n    def echo(self, text: str) -> str:\n        return text\n",
                 "service: service.py:Bare\n")
    refused = CliRunner().invoke(cli, ["containerize", bare, "--model-only", "--base", "scratch"])
    assert refused.exit_code == 1
    assert f"bento {bare} has no models: a model-only image would hold nothing" in refused.output
    assert not store_image_dir("bare").exists()

    # KServe's modelcar runs `sh -c ...`: a base without a shell would only fail in the pod
    with pytest.raises(BaseImageError, match=r"has no /bin/sh, which KServe's modelcar runs; .*--base scratch"):
        containerize_models(bento, base=tiny_base("linux/amd64"), output=tmp_path / "no-shell")
    # ... unless it is for KServe's native mode, which mounts /models and runs nothing
    scratch = containerize_models(bento, base="scratch", output=tmp_path / "scratch")
    assert [layer.comment.split()[0] for layer in scratch.layers] == ["model", "model"]

    with pytest.raises(ContainerizeError, match="has no models"):
        containerize_models(bare, base="scratch", output=tmp_path / "never")


@pytest.fixture
def modelcar(run_image: Callable[..., str]) -> Callable[[Path, str, Path], str]:
    """`modelcar(layout, tag, mnt)` -> container id: the image run as KServe runs a modelcar, with runc: its
    arguments, the host's process namespace (the pod's shared one) and `mnt` (the pod's emptyDir) at /mnt."""

    def run(layout: Path, tag: str, mnt: Path) -> str:
        return run_image(str(layout), tag, args=KSERVE_MODELCAR_ARGS, host_namespaces=("network", "pid"),
                         mounts={"/mnt": mnt})

    return run


def test_a_server_reads_its_models_from_a_modelcar_run_as_kserve_runs_it(bento: str, shell_base: str,
                                                                        tmp_path: Path, modelcar,
                                                                        start_server) -> None:
    image = containerize_models(bento, base=shell_base, output=tmp_path / "layout")
    mnt = tmp_path / "emptydir"
    mnt.mkdir()
    mnt.chmod(0o777)  # an emptyDir: the modelcar (uid 10001) makes its link there
    # KServe starts the predictor first and the modelcar beside it: the server waits for /mnt/models
    server = start_server(bento, args=["--models", str(mnt / "models")], ready=False)
    deadline = time.monotonic() + 60
    while "waiting up to 60 s for the models directory" not in server.log() and time.monotonic() < deadline:
        assert server.proc.poll() is None, server.log()
        time.sleep(0.05)
    modelcar(image.layout, image.tag, mnt)
    server.wait_ready()
    assert os.readlink(mnt / "models").startswith("/proc/")  # the models are read through the modelcar's root
    answer = httpx.post(f"{server.url}/predict", json={"x": [1.0, 2.0]}, timeout=10)
    assert answer.status_code == 200 and answer.json() == [4.0, 7.0]
    assert f"serving the models of {bento} from {mnt / 'models'}" in server.log()


def serve_exits(tag: str, env: dict[str, str]) -> str:
    """`pkg serve TAG` that must stop before it serves: its output."""
    proc = subprocess.run([sys.executable, "-m", "bento_like", "serve", tag, "--port", str(free_port())],
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    return proc.stderr


def test_a_tampered_or_missing_model_stops_the_server_naming_it(bento: str, shell_base: str, tmp_path: Path) -> None:
    require("umoci")
    if os.geteuid() != 0:
        pytest.skip("umoci unpack needs root here")
    image = containerize_models(bento, base=shell_base, output=tmp_path / "layout")
    subprocess.run(["umoci", "unpack", "--image", f"{image.layout}:{image.tag}", str(tmp_path / "bundle")],
                   check=True, capture_output=True)
    models = tmp_path / "bundle" / "rootfs" / "models"
    scale, offset = sorted(entry.tag for entry in BentoStore().get(bento).info.models)

    weights = next(p for p in (models / scale.replace(":", "/")).rglob("*") if p.is_file() and p.name != "manifest.yaml")
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    error = serve_exits(bento, {"BENTO_LIKE_MODELS_DIR": str(models)})
    assert f"Error: bento {bento}: model {scale} in {models}: " in error and weights.name in error, error

    shutil.rmtree(models / scale.split(":")[0])
    error = serve_exits(bento, {"BENTO_LIKE_MODELS_DIR": str(models)})
    assert f"Error: bento {bento}: model {scale} in {models}: no model" in error, error

    error = serve_exits(bento, {"BENTO_LIKE_MODELS_DIR": str(tmp_path / "nowhere"), "BENTO_LIKE_MODELS_WAIT_S": "0"})
    assert f"the models directory {tmp_path / 'nowhere'} of bento {bento} does not exist" in error, error


def test_the_serving_image_without_models_reads_them_from_the_modelcar_mount(bento: str, tiny_base,
                                                                             tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    full = containerize(bento, base=tiny_base("linux/amd64"), output=tmp_path / "layout", cache_dir=cache)
    slim = containerize(bento, base=tiny_base("linux/amd64"), output=tmp_path / "layout", cache_dir=cache,
                        without_models=True)
    assert slim.tag == f"{bento.split(':')[1]}-without-models" and full.tag == bento.split(":")[1]
    # the same layers, the models' left out: a node that has one image pulls no other layer for the other
    assert [(layer.comment, layer.digest) for layer in slim.layers] == [
        (layer.comment, layer.digest) for layer in full.layers if not layer.comment.startswith("model ")]
    assert len(full.layers) - len(slim.layers) == 2
    env = json.loads(blob(slim.layout, slim.config_digest).read_text())["config"]["Env"]
    assert f"{MODELS_DIR_ENV}={MODELCAR_MOUNT}" in env and MODELCAR_MOUNT == "/mnt/models"
    assert not any(item.startswith(MODELS_DIR_ENV) for item in
                   json.loads(blob(full.layout, full.config_digest).read_text())["config"]["Env"])
