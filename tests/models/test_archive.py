"""Export to one archive and import it back; hostile archives are refused and leave the store untouched."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from models_testlib import NearestCentroid, TinyNet
from store_helpers import snapshot, staging_leftovers

import bento_like as bl
from bento_like.models import ModelExistsError, ModelStoreError, TrustRequiredError, UnsafeArchiveError
from bento_like.models._manifest import MANIFEST_FILE


def save_files(tmp_path: Path, name: str = "vocab", data: bytes = b"a\nb\n") -> str:
    source = tmp_path / "src" / f"{name}.txt"
    source.parent.mkdir(exist_ok=True)
    source.write_bytes(data)
    return bl.models.save(name, source)


def members(archive: Path) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    with tarfile.open(archive) as tar:
        return [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar.getmembers()]


def write_tar(path: Path, entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def file_member(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def link_member(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info, None


def test_export_import_roundtrip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = TinyNet()
    x = torch.randn(4, 8)
    tag = bl.models.save("tiny", net, metadata={"acc": 0.9}, labels={"team": "a"})
    archive = bl.models.export_model(tag, tmp_path / "tiny.tar")
    assert [m.name for m, _ in members(archive)] == [
        f"{tag.replace(':', '/')}/{name}" for name in (MANIFEST_FILE, "module.pkl", "weights.pt")
    ]
    bl.models.delete(tag)
    assert bl.models.import_model(archive, trust=True) == tag
    model = bl.models.get(tag)
    assert (model.info.metadata, model.info.labels) == ({"acc": 0.9}, {"team": "a"})
    assert torch.equal(model.load()(x), net.eval()(x))
    assert bl.models.import_model(archive, trust=True) == tag  # again: already there, nothing changes


def test_export_is_reproducible_and_gzip_works(tmp_path: Path) -> None:
    tag = save_files(tmp_path)
    first = bl.models.export_model(tag, tmp_path / "a.tar.gz").read_bytes()
    assert bl.models.export_model(tag, tmp_path / "b.tar.gz").read_bytes() == first
    assert first[:2] == b"\x1f\x8b"
    bl.models.delete(tag)
    assert bl.models.import_model(tmp_path / "a.tar.gz") == tag  # files need no trust
    assert bl.models.get(tag).load().read_bytes() == b"a\nb\n"


def test_export_refuses_a_corrupted_model(tmp_path: Path) -> None:
    model = bl.models.get(save_files(tmp_path))
    (model.path / "files" / "vocab.txt").write_bytes(b"a\nX\n")
    with pytest.raises(ModelStoreError, match="corrupted"):
        bl.models.export_model(model.tag, tmp_path / "out.tar")
    assert not list(tmp_path.glob("*.tar")) and not list(tmp_path.glob(".*partial"))


def test_pickles_need_trust(tmp_path: Path, store_root: Path) -> None:
    estimator = NearestCentroid().fit(np.eye(2), np.array([0, 1]))
    tag = bl.models.save("nc", estimator)
    archive = bl.models.export_model(tag, tmp_path / "nc.tar")
    bl.models.delete(tag)
    before = snapshot(store_root)
    with pytest.raises(TrustRequiredError, match="unpickles files from the archive, which runs code"):
        bl.models.import_model(archive)
    assert snapshot(store_root) == before and staging_leftovers(store_root) == []
    assert bl.models.import_model(archive, trust=True) == tag


def test_existing_version_with_other_content_is_not_overwritten(tmp_path: Path) -> None:
    source = tmp_path / "w.txt"
    source.write_bytes(b"one")
    bl.models.save("w", source, version="v1")
    archive = bl.models.export_model("w:v1", tmp_path / "w.tar")
    bl.models.delete("w:v1")
    source.write_bytes(b"two")
    bl.models.save("w", source, version="v1")
    with pytest.raises(ModelExistsError):
        bl.models.import_model(archive)
    assert bl.models.get("w:v1").load().read_bytes() == b"two"


# hostile archives --------------------------------------------------------------------------------------


@pytest.fixture
def exported(tmp_path: Path) -> tuple[str, list[tuple[tarfile.TarInfo, bytes | None]]]:
    """A good archive's members, for tests to tamper with; the store is emptied again."""
    tag = save_files(tmp_path)
    entries = members(bl.models.export_model(tag, tmp_path / "good.tar"))
    bl.models.delete(tag)
    return tag, entries


def _tamper_cases() -> dict[str, tuple[Callable[[str, list], list], str]]:
    def replace_file(tag: str, entries: list) -> list:
        return [(m, b"a\nX\n" if m.name.endswith("vocab.txt") else d) for m, d in entries]

    def grow_file(tag: str, entries: list) -> list:
        return [(m, b"a\nEVIL\n" if m.name.endswith("vocab.txt") else d) for m, d in entries]

    def extra_file(tag: str, entries: list) -> list:
        return [*entries, file_member(f"{tag.replace(':', '/')}/files/extra.py", b"print('hi')")]

    def missing_file(tag: str, entries: list) -> list:
        return [(m, d) for m, d in entries if not m.name.endswith("vocab.txt")]

    def manifest_digest(tag: str, entries: list) -> list:
        def edit(m: tarfile.TarInfo, d: bytes) -> bytes:
            return d.replace(b"labels: {}", b"labels: {team: other}") if m.name.endswith(MANIFEST_FILE) else d

        return [(m, edit(m, d)) for m, d in entries]

    def manifest_elsewhere(tag: str, entries: list) -> list:
        version = tag.split(":")[1]
        return [(tarfile.TarInfo(m.name.replace(version, "v2")), d) for m, d in entries]

    def no_manifest(tag: str, entries: list) -> list:
        return [(m, d) for m, d in entries if not m.name.endswith(MANIFEST_FILE)]

    def two_models(tag: str, entries: list) -> list:
        return [*entries, file_member("other/v1/manifest.yaml", b"x")]

    def traversal(tag: str, entries: list) -> list:
        return [*entries, file_member(f"{tag.replace(':', '/')}/../../../../evil.txt", b"pwned")]

    def absolute(tag: str, entries: list) -> list:
        return [file_member("/tmp/bento_like_evil_absolute.txt", b"pwned"), *entries]

    def symlink_out(tag: str, entries: list) -> list:
        return [link_member(f"{tag.replace(':', '/')}/files/passwd", "/etc/passwd"), *entries]

    def symlink_up(tag: str, entries: list) -> list:
        return [link_member(f"{tag.replace(':', '/')}/files/up", "../../../../.."), *entries]

    def hardlink_out(tag: str, entries: list) -> list:
        return [link_member(f"{tag.replace(':', '/')}/files/h", "/etc/passwd", tarfile.LNKTYPE), *entries]

    def device(tag: str, entries: list) -> list:
        info = tarfile.TarInfo(f"{tag.replace(':', '/')}/files/null")
        info.type = tarfile.CHRTYPE
        return [(info, None), *entries]

    def outside_prefix(tag: str, entries: list) -> list:
        return [file_member("README", b"hello"), *entries]

    return {
        "replaced file": (replace_file, "does not match the manifest's size and sha256"),
        "grown file": (grow_file, "files/vocab.txt' is 7 bytes in the archive, the manifest says 4"),
        "extra file": (extra_file, r"member 'vocab/.*/files/extra.py' is not in the manifest"),
        "missing file": (missing_file, r"missing from the archive \['files/vocab.txt'\]"),
        "manifest edited": (manifest_digest, "manifest's digest does not match"),
        "manifest of another version": (manifest_elsewhere, "describes vocab:.* but the files are under vocab/v2"),
        "no manifest": (no_manifest, "the first file must be <name>/<version>/manifest.yaml"),
        "two models": (two_models, "holds more than one model"),
        "path traversal": (traversal, "points outside the model"),
        "absolute path": (absolute, "points outside the model"),
        "symlink out": (symlink_out, "is a link to '/etc/passwd'"),
        "symlink up": (symlink_up, r"is a link to '\.\./\.\./"),
        "hardlink out": (hardlink_out, "is a link to '/etc/passwd'"),
        "device": (device, "device, fifo or other special file"),
        "outside name/version": (outside_prefix, r"'README' is not under <name>/<version>/"),
    }


@pytest.mark.parametrize("case", sorted(_tamper_cases()))
def test_hostile_archive_is_refused_and_store_untouched(
    case: str, exported: tuple[str, list], tmp_path: Path, store_root: Path
) -> None:
    tamper, message = _tamper_cases()[case]
    tag, entries = exported
    archive = write_tar(tmp_path / "hostile.tar", tamper(tag, entries))
    other = save_files(tmp_path, name="bystander", data=b"keep me")
    before = snapshot(store_root)
    with pytest.raises(UnsafeArchiveError, match=message):
        bl.models.import_model(archive, trust=True)
    assert snapshot(store_root) == before
    assert staging_leftovers(store_root) == []
    assert [m.tag for m in bl.models.list()] == [other]
    assert not (tmp_path / "evil.txt").exists() and not Path("/tmp/bento_like_evil_absolute.txt").exists()


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz"])
def test_truncated_archive(suffix: str, tmp_path: Path, store_root: Path) -> None:
    tag = save_files(tmp_path, data=bytes(range(256)) * 400)
    archive = bl.models.export_model(tag, tmp_path / f"m{suffix}")
    bl.models.delete(tag)
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(UnsafeArchiveError, match="damaged archive"):
        bl.models.import_model(archive)
    assert bl.models.list() == [] and staging_leftovers(store_root) == []


def test_not_an_archive(tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar file at all" * 100)
    with pytest.raises(ModelStoreError, match="not a readable model archive"):
        bl.models.import_model(junk)
