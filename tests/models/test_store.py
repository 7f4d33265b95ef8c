"""The store itself: tags and versions, latest, listing, deleting, concurrent writers, integrity at load."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest
from store_helpers import HERE, run_python, staging_leftovers

import bento_like as bl
from bento_like.models import (
    IntegrityError,
    InvalidTagError,
    ManifestError,
    ModelExistsError,
    ModelNotFoundError,
    ModelStore,
    ModelStoreError,
)
from bento_like.models._manifest import CHUNK_SIZE, MANIFEST_FILE


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_save_get_roundtrip_records_manifest(tmp_path: Path, store_root: Path) -> None:
    source = write(tmp_path / "vocab.txt", b"a\nb\nc\n")
    tag = bl.models.save("vocab", source, metadata={"acc": 0.97, "sizes": [1, 2]}, labels={"team": "fraud"})
    name, version = tag.split(":")
    model = bl.models.get(tag)
    assert (name, model.path) == ("vocab", store_root / "vocab" / version)
    info = model.info
    assert (info.framework, info.metadata, info.labels) == ("files", {"acc": 0.97, "sizes": [1, 2]}, {"team": "fraud"})
    assert [(f.path, f.size) for f in info.files] == [("files/vocab.txt", 6)]
    assert info.schema_version == 1 and info.library_versions["python"]
    assert model.load().read_bytes() == b"a\nb\nc\n"
    on_disk = msgspec.yaml.decode((model.path / MANIFEST_FILE).read_bytes())
    assert on_disk["name"] == "vocab" and on_disk["version"] == version


def test_sha256_is_the_plain_file_digest(tmp_path: Path) -> None:
    import hashlib

    data = os.urandom(1000)
    info = bl.models.get(bl.models.save("blob", write(tmp_path / "blob.bin", data))).info
    assert info.files[0].sha256 == hashlib.sha256(data).hexdigest()
    assert info.files[0].chunk_sha256 == []


def test_version_comes_from_content(tmp_path: Path, store_root: Path) -> None:
    source = write(tmp_path / "w.bin", b"weights")
    first = bl.models.save("w", source)
    assert bl.models.save("w", source) == first  # same content: same version, nothing written
    assert len(list((store_root / "w").iterdir())) == 1
    assert bl.models.save("w", source, metadata={"note": "x"}) != first  # metadata is part of the content
    write(source, b"weights2")
    assert bl.models.save("w", source) != first
    assert bl.models.save("w", source, version="v1") == "w:v1"


def test_given_version_with_other_content_is_refused(tmp_path: Path) -> None:
    bl.models.save("w", write(tmp_path / "a", b"a"), version="v1")
    assert bl.models.save("w", tmp_path / "a", version="v1") == "w:v1"
    with pytest.raises(ModelExistsError, match="w:v1 already exists with different content"):
        bl.models.save("w", write(tmp_path / "b", b"b"), version="v1")


def test_latest_is_the_newest_by_creation_time(tmp_path: Path) -> None:
    tags = [bl.models.save("m", write(tmp_path / f"{i}", str(i).encode())) for i in range(3)]
    assert bl.models.get("m:latest").tag == tags[-1]
    assert bl.models.get("m").tag == tags[-1]
    bl.models.delete(tags[-1])
    assert bl.models.get("m:latest").tag == tags[-2]
    assert [m.tag for m in bl.models.list("m")] == [tags[1], tags[0]]


@pytest.mark.parametrize("tag", ["Upper", "a b", "../x", "m:latest:x", "m:", "-m", "m:LATEST!", ""])
def test_bad_tags_are_refused(tag: str) -> None:
    with pytest.raises(InvalidTagError):
        bl.models.get(tag)


def test_latest_cannot_be_a_saved_version(tmp_path: Path) -> None:
    with pytest.raises(InvalidTagError, match="reserved"):
        bl.models.save("m", write(tmp_path / "a", b"a"), version="latest")


def test_unknown_tag_names_existing_tags(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="is empty"):
        bl.models.get("mlp:latest")
    a = bl.models.save("mlp", write(tmp_path / "a", b"a"))
    b = bl.models.save("other", write(tmp_path / "b", b"b"))
    with pytest.raises(ModelNotFoundError) as missing_version:
        bl.models.get("mlp:0123")
    assert a in str(missing_version.value) and b not in str(missing_version.value)
    with pytest.raises(ModelNotFoundError) as missing_name:
        bl.models.get("nope")
    assert a in str(missing_name.value) and b in str(missing_name.value)


def test_list_filters_by_name_and_labels(tmp_path: Path) -> None:
    fraud = bl.models.save("a", write(tmp_path / "1", b"1"), labels={"team": "fraud", "stage": "prod"})
    search = bl.models.save("b", write(tmp_path / "2", b"2"), labels={"team": "search"})
    assert [m.tag for m in bl.models.list()] == [fraud, search]
    assert [m.tag for m in bl.models.list("b")] == [search]
    assert [m.tag for m in bl.models.list(labels={"team": "fraud"})] == [fraud]
    assert [m.tag for m in bl.models.list(labels={"team": "fraud", "stage": "dev"})] == []
    assert bl.models.list("zzz") == []


def test_metadata_must_be_json(tmp_path: Path) -> None:
    with pytest.raises(ModelStoreError, match="metadata must hold only JSON values"):
        bl.models.save("m", write(tmp_path / "a", b"a"), metadata={"when": object()})
    with pytest.raises(ModelStoreError, match="labels must map str to str"):
        bl.models.save("m", tmp_path / "a", labels={"n": 1})


def test_delete_needs_a_version_and_removes_only_that(tmp_path: Path, store_root: Path) -> None:
    one = bl.models.save("m", write(tmp_path / "a", b"a"))
    two = bl.models.save("m", write(tmp_path / "b", b"b"))
    with pytest.raises(InvalidTagError, match="delete needs a version"):
        bl.models.delete("m")
    assert bl.models.delete(one) == one
    assert [m.tag for m in bl.models.list()] == [two]
    assert bl.models.delete("m:latest") == two
    assert not (store_root / "m").exists()
    assert staging_leftovers(store_root) == []
    with pytest.raises(ModelNotFoundError):
        bl.models.delete(two)


def test_a_store_can_live_anywhere(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "bento" / "models")
    tag = store.save("m", write(tmp_path / "a", b"a"))
    assert store.get(tag).path.parent.parent == tmp_path / "bento" / "models"
    assert bl.models.list() == []


def test_manifest_describing_another_model_is_refused(tmp_path: Path, store_root: Path) -> None:
    tag = bl.models.save("m", write(tmp_path / "a", b"a"))
    version = tag.split(":")[1]
    os.rename(store_root / "m" / version, store_root / "m" / "renamed")
    with pytest.raises(ManifestError, match="describes"):
        bl.models.get("m:renamed")
    with pytest.warns(UserWarning, match="skipping an unreadable model version"):
        assert bl.models.list() == []


def test_newer_manifest_schema_says_upgrade(tmp_path: Path) -> None:
    model = bl.models.get(bl.models.save("m", write(tmp_path / "a", b"a")))
    manifest = model.path / MANIFEST_FILE
    manifest.write_text(manifest.read_text().replace("schema_version: 1", "schema_version: 99"))
    with pytest.raises(ManifestError, match="schema 99 is newer .* upgrade bento_like"):
        bl.models.get(model.tag)


def test_manifest_errors_name_the_field(tmp_path: Path) -> None:
    model = bl.models.get(bl.models.save("m", write(tmp_path / "a", b"a")))
    manifest = model.path / MANIFEST_FILE
    manifest.write_text(manifest.read_text().replace("framework: files", "framework: [1]"))
    with pytest.raises(ManifestError, match=r"\$\.framework"):
        bl.models.get(model.tag)


# integrity ---------------------------------------------------------------------------------------------


def test_flipped_byte_is_detected_at_load(tmp_path: Path) -> None:
    model = bl.models.get(bl.models.save("m", write(tmp_path / "w.bin", os.urandom(4096))))
    stored = model.path / "files" / "w.bin"
    data = bytearray(stored.read_bytes())
    data[1234] ^= 0x01
    stored.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"file 'files/w.bin' is corrupted: sha256 is [0-9a-f]{64}, the manifest"):
        model.load()
    assert model.load(verify=False).read_bytes() == bytes(data)  # verify=False is the explicit way around


def test_truncated_and_missing_files_are_detected(tmp_path: Path) -> None:
    model = bl.models.get(bl.models.save("m", write(tmp_path / "w.bin", b"x" * 100)))
    stored = model.path / "files" / "w.bin"
    stored.write_bytes(b"x" * 40)
    with pytest.raises(IntegrityError, match=r"'files/w.bin' is 40 bytes, the manifest says 100; it is truncated"):
        model.load()
    stored.unlink()
    with pytest.raises(IntegrityError, match="'files/w.bin' is missing"):
        model.verify()


def test_large_files_are_verified_chunk_by_chunk(tmp_path: Path) -> None:
    data = os.urandom(CHUNK_SIZE + 4096)
    model = bl.models.get(bl.models.save("big", write(tmp_path / "big.bin", data)))
    entry = model.info.files[0]
    assert len(entry.chunk_sha256) == 2
    model.verify()
    stored = model.path / "files" / "big.bin"
    with open(stored, "r+b") as f:
        f.seek(CHUNK_SIZE + 10)
        f.write(bytes([data[CHUNK_SIZE + 10] ^ 0xFF]))
    with pytest.raises(IntegrityError, match=f"'files/big.bin' is corrupted: sha256 in the chunk at byte {CHUNK_SIZE}"):
        model.load()


# concurrency -------------------------------------------------------------------------------------------

_CONCURRENT_SAVER = """
import json, os, sys, time
from pathlib import Path
import bento_like.models as models
go, out, work = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
while not go.exists():
    time.sleep(0.001)
tags = []
for i in range(5):
    payload = work / str(os.getpid()) / f"shared-{i}.bin"     # same name and content in both processes
    payload.parent.mkdir(exist_ok=True)
    payload.write_bytes(bytes([i]) * (4 << 20))
    tags.append(models.save("shared", payload))
    own = work / f"own-{os.getpid()}-{i}.bin"
    own.write_bytes(str((os.getpid(), i)).encode())      # content only this process saves
    tags.append(models.save("mixed", own))
out.write_text(json.dumps(tags))
"""


def test_two_processes_saving_at_once(tmp_path: Path, store_root: Path) -> None:
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CONCURRENT_SAVER, str(go), str(tmp_path / f"out{i}.json"), str(tmp_path)],
            env=env,
        )
        for i in range(2)
    ]
    time.sleep(0.5)  # both interpreters up and polling
    go.touch()
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    first, second = (json.loads((tmp_path / f"out{i}.json").read_text()) for i in range(2))
    assert first[0::2] == second[0::2]  # the shared saves agree on every version
    assert sorted(m.tag for m in bl.models.list("shared")) == sorted(set(first[0::2]))
    assert len(bl.models.list("shared")) == 5
    assert sorted(m.tag for m in bl.models.list("mixed")) == sorted(first[1::2] + second[1::2])
    for model in bl.models.list():
        model.verify()
    assert staging_leftovers(store_root) == []


def test_latest_is_resolved_at_each_call_across_processes(tmp_path: Path) -> None:
    first = bl.models.save("m", write(tmp_path / "a", b"a"))
    other = write(tmp_path / "b", b"b")
    result = run_python(f"import bento_like.models as m; print(m.save('m', {str(other)!r}))")
    assert result.returncode == 0, result.stderr
    second = result.stdout.strip()
    assert second != first and bl.models.get("m:latest").tag == second


def test_importing_the_store_imports_no_framework() -> None:
    result = run_python(
        "import sys, bento_like.models, bento_like.sdk.model_ref;"
        "print([m for m in ('torch', 'onnx', 'onnxruntime', 'cloudpickle') if m in sys.modules])"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
