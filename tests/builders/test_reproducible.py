"""The image is a function of the bento version: the same code and the same model, saved and built in two empty
BENTO_LIKE_HOMEs at different times, give the same bento version and the same image digest."""

from __future__ import annotations

import gzip
import json
import tarfile
import time
from pathlib import Path

import pytest
import yaml

import bento_like as bl
from bento_like.builders.bento import build_bento
from bento_like.builders.containerize import BENTO_DIR, containerize

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


def build_in_fresh_home(root: Path, project: Path, base: str, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    home = root / "home"
    home.mkdir(parents=True)
    monkeypatch.setenv("BENTO_LIKE_HOME", str(home))  # a fresh model store, bento store, lock and layer cache
    bl.models.save("weights", {"scale": 3.0}, framework="pickle")
    tag = build_bento(project).bento.tag
    return tag, containerize(tag, base=base, output=root / "image")


def layer_file(layout: Path, digest: str, name: str) -> bytes:
    with gzip.open(layout / "blobs" / "sha256" / digest.split(":")[1]) as raw, tarfile.open(fileobj=raw) as tar:
        member = tar.extractfile(name.lstrip("/"))
        assert member is not None, name
        return member.read()


def test_two_fresh_homes_give_the_same_version_and_image(tmp_path: Path, tiny_base,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    project = tmp_path / "proj"
    project.mkdir()
    (project / "service.py").write_text(SERVICE)
    (project / "bentofile.yaml").write_text("service: service.py:Scaler\n")
    base = tiny_base("linux/amd64")
    first_tag, first = build_in_fresh_home(tmp_path / "one", project, base, monkeypatch)
    time.sleep(1.1)  # every time stamp a build writes differs from the first build's
    second_tag, second = build_in_fresh_home(tmp_path / "two", project, base, monkeypatch)
    assert second_tag == first_tag
    before = {layer.comment: layer.digest for layer in first.layers}
    after = {layer.comment: layer.digest for layer in second.layers}
    changed = [comment for comment in after if after[comment] != before.get(comment)]
    assert not changed, f"layers that differ: {changed}"
    assert second.manifest_digest == first.manifest_digest

    # The shipped manifests carry the image's epoch (SOURCE_DATE_EPOCH, else 0), not when anything was built.
    code = next(layer for layer in second.layers if layer.comment.startswith("code"))
    shipped = yaml.safe_load(layer_file(tmp_path / "two" / "image", code.digest, f"{BENTO_DIR}/bento.yaml"))
    assert shipped["build"]["created_at"] == "1970-01-01T00:00:00.000000Z"
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    dated = containerize(second_tag, base=base, output=tmp_path / "dated")
    config = json.loads((tmp_path / "dated" / "blobs" / "sha256" / dated.config_digest.split(":")[1]).read_bytes())
    assert config["created"] == "2023-11-14T22:13:20Z"
    model = next(layer for layer in dated.layers if layer.comment.startswith("model"))
    name, version = bl.models.get("weights:latest").tag.split(":")
    manifest = layer_file(tmp_path / "dated", model.digest, f"{BENTO_DIR}/models/{name}/{version}/manifest.yaml")
    assert str(yaml.safe_load(manifest)["created_at"]).startswith("2023-11-14")
