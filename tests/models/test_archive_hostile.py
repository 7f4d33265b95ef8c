"""Hostile model archives, built the way an attacker would (a manifest whose entries and digest agree with
its files): each is refused with an UnsafeArchiveError before it costs memory or disk, and leaves the store
and its staging area as they were."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
import yaml
from archive_helpers import alias_bomb, file_size_limit, tar_of
from store_helpers import forged_manifest, snapshot, staging_leftovers

import bento_like as bl
from bento_like.models import ModelInfo, ModelStoreError, UnsafeArchiveError
from bento_like.models._manifest import content_digest

MiB = 2**20


def forged(tmp_path: Path, files: dict[str, bytes], version: str | None = None, extra=(), edit=None, **fields):
    """A model archive `m:<version>` holding `files` and, after them, the `extra` (name, content) members."""
    version, manifest = forged_manifest("m", version, files, **fields)
    if edit is not None:
        manifest = edit(manifest)
    prefix = f"m/{version}"
    members = [(f"{prefix}/manifest.yaml", manifest), *((f"{prefix}/{p}", d) for p, d in files.items())]
    members += [(f"{prefix}/{p}", d) for p, d in extra]
    return tar_of(tmp_path / "m.tar.gz", members, "w:gz")


def refused(archive: Path, store_root: Path, match: str, trust: bool = False) -> None:
    before = snapshot(store_root)
    with pytest.raises(UnsafeArchiveError, match=match):
        bl.models.import_model(archive, trust=trust)
    assert snapshot(store_root) == before and staging_leftovers(store_root) == []


FILES = {"files/a/x.txt": b"hi"}


def metadata_yaml(text: str, fix_digest: bool = True):
    """An edit putting `text` in place of the manifest's `metadata: {}`, with the digest of what PyYAML reads
    from it (so that only the reader stands between it and the store)."""

    def edit(manifest: bytes) -> bytes:
        edited = manifest.replace(b"metadata: {}\n", text.encode())
        if not fix_digest:
            return edited
        info = msgspec.yaml.decode(manifest, type=ModelInfo)
        expanded = yaml.safe_load(text)["metadata"]
        digest = content_digest(info.framework, info.files, info.signatures, expanded, info.labels, info.details)
        return edited.replace(info.digest.encode(), digest.encode())

    return edit


# item 3: manifests are parsed without aliases, and only up to a size ---------------------------------


def test_alias_in_the_manifest_is_refused(tmp_path: Path, store_root: Path) -> None:
    archive = forged(tmp_path, FILES, version="v1", edit=metadata_yaml("metadata:\n" + alias_bomb(3)))
    refused(archive, store_root, r"manifest.yaml.*anchors and aliases")


def test_deep_nesting_in_the_manifest_is_refused(tmp_path: Path, store_root: Path) -> None:
    deep = "metadata: {x: " + "[" * 200 + "]" * 200 + "}\n"
    archive = forged(tmp_path, FILES, version="v1", edit=metadata_yaml(deep))
    refused(archive, store_root, r"manifest.yaml.*nested more than 64 deep")


def test_a_manifest_over_the_limit_is_refused_before_it_is_read(tmp_path: Path, store_root: Path) -> None:
    version, _ = forged_manifest("m", None, FILES)
    archive = tar_of(tmp_path / "big.tar", [(f"m/{version}/manifest.yaml", 64 * MiB)])
    refused(archive, store_root, r"manifest.yaml is 67108864 bytes, over the 16 MiB limit for a manifest \(BENTO_LIKE_")


def test_the_manifest_limit_can_be_set_and_is_validated(
    tmp_path: Path, store_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = forged(tmp_path, FILES, metadata={"notes": "x" * (2 * MiB)})
    monkeypatch.setenv("BENTO_LIKE_MAX_MANIFEST_MB", "1")
    refused(archive, store_root, "over the 1 MiB limit")
    monkeypatch.setenv("BENTO_LIKE_MAX_MANIFEST_MB", "lots")
    with pytest.raises(ModelStoreError, match="BENTO_LIKE_MAX_MANIFEST_MB='lots': expected a whole number of MiB"):
        bl.models.import_model(archive)
    monkeypatch.setenv("BENTO_LIKE_MAX_MANIFEST_MB", "3")
    assert bl.models.get(bl.models.import_model(archive)).info.metadata["notes"] == "x" * (2 * MiB)


def _run_cli(*args: str, memory_limit: int) -> subprocess.CompletedProcess[str]:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))

    return subprocess.run(
        [sys.executable, "-m", "bento_like", *args], capture_output=True, text=True, timeout=120,
        preexec_fn=limit, env=os.environ,
    )


def test_the_issue_alias_bomb_is_one_error_line(tmp_path: Path, store_root: Path) -> None:
    """Nine levels expand to 10**9 items; the child runs under a 2 GiB address-space limit so that a reader
    that expands them fails fast instead of taking the machine."""
    archive = forged(tmp_path, FILES, edit=metadata_yaml("metadata:\n" + alias_bomb(9), fix_digest=False))
    assert archive.stat().st_size < 4096
    result = _run_cli("models", "import", str(archive), memory_limit=2**31)
    assert result.returncode == 1, result.stderr
    assert result.stdout == "" and len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith("Error: ") and "anchors and aliases" in result.stderr
    assert staging_leftovers(store_root) == [] and bl.models.list() == []


# item 6: every member is checked against the manifest before a byte of it is written ----------------


def test_a_large_member_the_manifest_does_not_list_is_refused_unwritten(tmp_path: Path, store_root: Path) -> None:
    archive = forged(tmp_path, FILES, extra=[("files/zeros", 256 * MiB)])
    assert archive.stat().st_size < 2 * MiB
    with file_size_limit(16 * MiB):  # extracting it would fail with EFBIG, not with the refusal
        refused(archive, store_root, r"member 'm/.*/files/zeros' is not in the manifest")


def test_a_member_larger_than_its_manifest_entry_is_refused_unwritten(tmp_path: Path, store_root: Path) -> None:
    version, manifest = forged_manifest("m", None, FILES)
    archive = tar_of(
        tmp_path / "m.tar.gz",
        [(f"m/{version}/manifest.yaml", manifest), (f"m/{version}/files/a/x.txt", 256 * MiB)],
        "w:gz",
    )
    with file_size_limit(16 * MiB):
        refused(archive, store_root, r"'m/.*/files/a/x.txt' is 268435456 bytes in the archive, the manifest says 2")


def test_an_archive_of_endless_entries_is_refused_at_the_entry_limit(tmp_path: Path, store_root: Path) -> None:
    import io
    import tarfile

    from bento_like._archives import MAX_MEMBERS

    version, manifest = forged_manifest("m", None, FILES)
    archive = tmp_path / "m.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo(f"m/{version}/manifest.yaml")
        info.size = len(manifest)
        tar.addfile(info, io.BytesIO(manifest))
        for i in range(MAX_MEMBERS + 1):  # directories: no manifest lists them, so only the count stops them
            entry = tarfile.TarInfo(f"m/{version}/d{i}")
            entry.type = tarfile.DIRTYPE
            tar.addfile(entry)
    refused(archive, store_root, rf"more than {MAX_MEMBERS} entries; refused")


def test_the_manifest_must_come_first(tmp_path: Path, store_root: Path) -> None:
    version, manifest = forged_manifest("m", None, FILES)
    archive = tar_of(
        tmp_path / "m.tar", [(f"m/{version}/files/a/x.txt", b"hi"), (f"m/{version}/manifest.yaml", manifest)]
    )
    refused(archive, store_root, r"the first file must be <name>/<version>/manifest.yaml, not 'm/.*/files/a/x.txt'")


# item 10: the version is checked against the content -------------------------------------------------


def test_a_digest_like_version_must_be_the_contents_digest(tmp_path: Path, store_root: Path) -> None:
    archive = forged(tmp_path, FILES, version="e8651653c752443a")
    message = r"version 'e8651653c752443a' looks like a content digest but the content's is '[0-9a-f]{16}'"
    refused(archive, store_root, message)


def test_save_refuses_a_digest_like_version_of_other_content(tmp_path: Path) -> None:
    source = tmp_path / "w.txt"
    source.write_bytes(b"w")
    with pytest.raises(ModelStoreError, match="looks like a content digest"):
        bl.models.save("w", source, version="e8651653c752443a")
    tag = bl.models.save("w", source)
    assert bl.models.save("w", source, version=tag.split(":")[1]) == tag  # its own digest is fine


# item 11: ONNX external data stays inside the model --------------------------------------------------


def _onnx_with_external_data(location: str) -> dict[str, bytes]:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.arange(4, dtype=np.float32), "w")
    data = weight.raw_data
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(len(data)))):
        weight.external_data.add(key=key, value=value)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], [weight],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    return {"model.onnx": proto.SerializeToString(), "w.bin": data}


@pytest.mark.parametrize(
    ("location", "message"),
    [
        ("../../etc/hostname", r"external data location '../../etc/hostname' does not stay beside the model"),
        ("/etc/hostname", r"external data location '/etc/hostname' does not stay beside the model"),
        ("other.bin", r"refers to external data 'other.bin', which is not one of its files"),
    ],
)
def test_onnx_external_data_outside_the_model_is_refused(
    location: str, message: str, tmp_path: Path, store_root: Path
) -> None:
    archive = forged(tmp_path, _onnx_with_external_data(location), framework="onnx")
    refused(archive, store_root, message)


def test_onnx_external_data_beside_the_model_imports_and_runs(tmp_path: Path) -> None:
    import numpy as np

    tag = bl.models.import_model(forged(tmp_path, _onnx_with_external_data("w.bin"), framework="onnx"))
    session = bl.models.get(tag).load()
    (y,) = session.run(None, {"x": np.ones(4, dtype=np.float32)})
    assert y.tolist() == [1.0, 2.0, 3.0, 4.0]


# item 12: a file and a directory of the same name ---------------------------------------------------


@pytest.mark.parametrize("order", [["files/a", "files/a/b"], ["files/a/b", "files/a"]])
def test_a_file_and_a_directory_of_one_name_is_refused(order: list[str], tmp_path: Path, store_root: Path) -> None:
    archive = forged(tmp_path, {path: b"x" for path in order})
    refused(archive, store_root, r"'m/.*/files/a' is both a file and a directory")


def test_cli_prints_one_error_line_for_a_file_and_a_directory_of_one_name(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from bento_like.cli.models import models_group

    result = CliRunner().invoke(models_group, ["import", str(forged(tmp_path, {"files/a": b"x", "files/a/b": b"y"}))])
    assert result.exit_code == 1 and result.exception.__class__ is SystemExit
    assert result.output.startswith("Error: ") and len(result.output.splitlines()) == 1
