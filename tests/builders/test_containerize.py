"""From a service to a running image: pkg build, pkg containerize (daemonless), pkg push to a real registry,
pulled back with skopeo, unpacked with umoci, run with runc, and asked for a real prediction from outside."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

import bento_like as bl
from bento_like.builders.bento import build_bento
from bento_like.builders.base import BaseImageError, default_base
from bento_like.builders.containerize import containerize
from bento_like.builders.oci import ImageConfig, LayerSpec, build_image
from bento_like.cli.main import cli

from live_server import free_port

SERVICE = '''
import numpy as np
import bento_like as bl


@bl.service(name="scaler")
class Scaler:
    weights = bl.model("weights:latest")

    @bl.api
    def predict(self, x: np.ndarray) -> np.ndarray:
        return x * self.weights["scale"]
'''

pytestmark = pytest.mark.slow


@pytest.fixture
def bento(tmp_path: Path, home: Path, python_base_layout) -> str:
    bl.models.save("weights", {"scale": 3.0}, framework="pickle")
    project = tmp_path / "proj"
    project.mkdir()
    (project / "service.py").write_text(SERVICE)
    base = f"oci:{python_base_layout.layout}:{python_base_layout.tag}"
    (project / "bentofile.yaml").write_text(f"service: service.py:Scaler\nbase_image: '{base}'\nlabels: {{team: fraud}}\n")
    return build_bento(project).bento.tag


def layer_comments(result) -> list[tuple[str, str]]:  # type: ignore[no-untyped-def]
    return [(layer.comment, layer.digest) for layer in result.layers]


def test_image_is_reproducible_layered_and_a_code_change_rebuilds_one_layer(bento: str, tmp_path: Path) -> None:
    lines: list[str] = []
    first = containerize(bento, output=tmp_path / "a", progress=lines.append)
    again = containerize(bento, output=tmp_path / "b")
    assert again.manifest_digest == first.manifest_digest
    # a line for each step, so a minute of pip or of compressing is never silent
    assert any(line.startswith(("dependencies: pip installs", "dependencies: cached")) for line in lines), lines
    assert any(re.fullmatch(r"layer \d+/\d+ code \+ manifest: (compressing [\d.]+ MB|cached \([\d.]+ MB\))", line)
               for line in lines), lines
    comments = [c for c, _ in layer_comments(first)]
    assert comments[-4:] == ["python dependencies", "bento_like runtime", f"model {bl.models.get('weights:latest').tag}",
                             "code + manifest"]
    config = json.loads((tmp_path / "a" / "blobs" / "sha256" / first.config_digest.split(":")[1]).read_text())
    assert config["config"]["User"] == "10001:10001"
    assert config["config"]["ExposedPorts"] == {"3000/tcp": {}}
    assert config["config"]["Entrypoint"][:4] == ["python3", "-m", "bento_like", "serve"]
    assert config["config"]["Labels"]["org.opencontainers.image.version"] == bento.split(":")[1]
    inspect = json.loads(subprocess.run(["skopeo", "inspect", f"oci:{tmp_path / 'a'}:{first.tag}"],
                                        capture_output=True, text=True, check=True).stdout)
    assert inspect["Digest"] == first.manifest_digest
    subprocess.run(["umoci", "stat", "--image", f"{tmp_path / 'a'}:{first.tag}"], check=True, capture_output=True)
    # the image carries no builders (no exporter, quantizer or TensorRT builder)
    runtime = next(layer for layer in first.layers if layer.comment == "bento_like runtime")
    assert runtime.size < 500_000

    project = tmp_path / "proj"
    (project / "service.py").write_text(SERVICE + "\n# one more line\n")
    changed = containerize(build_bento(project).bento.tag, output=tmp_path / "a")
    before, after = dict(layer_comments(first)), dict(layer_comments(changed))
    assert [c for c in after if after[c] != before.get(c)] == ["code + manifest"]


def test_a_base_that_cannot_be_had_fails_before_any_dependency_is_installed(
        home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bl.models.save("weights", {"scale": 3.0}, framework="pickle")
    (tmp_path / "service.py").write_text(SERVICE)
    (tmp_path / "bentofile.yaml").write_text("service: service.py:Scaler\n")
    tag = build_bento(tmp_path).bento.tag
    assert default_base("3.11") == "docker.io/library/python:3.11-slim"  # what containerize pulls when told nothing
    lines: list[str] = []
    monkeypatch.setenv("BENTO_LIKE_BASE_IMAGE", f"127.0.0.1:{free_port()}/library/python:3.11-slim")  # nobody there
    with pytest.raises(BaseImageError, match=r"can't be pulled .*make one with `pkg base create --python 3.11`"):
        containerize(tag, progress=lines.append)
    with pytest.raises(BaseImageError, match=r"the OCI archive .*missing.tar does not exist; make one with"):
        containerize(tag, base=f"oci-archive:{tmp_path / 'missing.tar'}:base", progress=lines.append)
    layout = tmp_path / "no-python"
    build_image(None, [LayerSpec.files({"/etc/os-release": "tiny"}, comment="no python")], ImageConfig(user=None), layout,
                "base")
    with pytest.raises(BaseImageError, match=r"holds no python3.11 \(its pythons: none\)"):
        containerize(tag, base=f"oci:{layout}:base", progress=lines.append)
    assert not any(line.startswith("dependencies") for line in lines), lines


def test_push_pull_run_and_predict(bento: str, tmp_path: Path, registry, run_image) -> None:
    missing = [tool for tool in ("skopeo", "umoci", "runc") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")
    runner = CliRunner()
    out = tmp_path / "layout"
    dest = f"{registry.host}/scaler:v1"
    built = runner.invoke(cli, ["containerize", bento, "--output", str(out), "--tag", "v1", "--push", dest])
    assert built.exit_code == 0, built.output
    assert "uploaded" in built.output
    again = runner.invoke(cli, ["push", f"oci:{out}:v1", dest])
    assert again.exit_code == 0, again.output
    assert " 0 uploaded" in again.output  # every blob was already there

    pulled = tmp_path / "pulled"
    subprocess.run(["skopeo", "copy", "--src-tls-verify=false", f"docker://{dest}", f"oci:{pulled}:v1"],
                   check=True, capture_output=True)
    local = json.loads(subprocess.run(["skopeo", "inspect", f"oci:{out}:v1"], capture_output=True, text=True,
                                      check=True).stdout)["Digest"]
    remote = json.loads(subprocess.run(["skopeo", "inspect", f"oci:{pulled}:v1"], capture_output=True, text=True,
                                       check=True).stdout)["Digest"]
    assert local == remote

    # for scripts: one JSON document on stdout, progress on stderr
    pushed = runner.invoke(cli, ["push", f"oci:{out}:v1", dest, "-o", "json"])
    assert pushed.exit_code == 0, pushed.output
    document = json.loads(pushed.stdout)
    assert document["digest"] == local and document["uploaded"] == [] and document["reference"].endswith(dest)
    rebuilt = runner.invoke(cli, ["containerize", bento, "--output", str(out), "--tag", "v1", "-o", "json"])
    assert rebuilt.exit_code == 0, rebuilt.output
    image = json.loads(rebuilt.stdout)
    assert image["digest"] == local and image["reference"] == f"oci:{out}:v1"
    assert {layer["source"] for layer in image["layers"]} <= {"base", "cached"} and image["layers"][-1]["size"] > 0

    port = free_port()
    run_image(str(pulled), "v1", env={"BENTO_LIKE_PORT": str(port)})
    deadline = time.monotonic() + 60
    answer = None
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                answer = httpx.post(f"http://127.0.0.1:{port}/predict", json={"x": [1.0, 2.0]}, timeout=5)
                break
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    assert answer is not None, "the container never became ready"
    assert answer.status_code == 200 and answer.json() == [3.0, 6.0]
