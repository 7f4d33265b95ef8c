"""verify() (and so load()) covers the manifest itself: its digest must be that of what it describes, a
digest-like version must be that digest, and the version directory holds exactly the listed files."""

from __future__ import annotations

import hashlib
from pathlib import Path

import msgspec
import pytest

import bento_like as bl
from bento_like.models import IntegrityError, ModelInfo
from bento_like.models._manifest import MANIFEST_FILE, encode


def saved_directory_model(tmp_path: Path, version: str | None = None) -> bl.models.Model:
    source = tmp_path / "vocab"
    source.mkdir()
    (source / "words.txt").write_bytes(b"a\nb\n")
    return bl.models.get(bl.models.save("vocab", source, version=version, metadata={"acc": 0.9}))


def rewrite(model: bl.models.Model, **changes: object) -> None:
    path = model.path / MANIFEST_FILE
    info = msgspec.yaml.decode(path.read_bytes(), type=ModelInfo)
    path.write_bytes(encode(msgspec.structs.replace(info, **changes)))


def test_edited_metadata_fails_verify(tmp_path: Path) -> None:
    model = saved_directory_model(tmp_path)
    rewrite(model, metadata={"acc": 0.99})
    with pytest.raises(IntegrityError, match=r"vocab:[0-9a-f]{16}: the manifest's digest does not match what it desc"):
        bl.models.get(model.tag).load()


def test_a_changed_file_with_an_updated_sha256_fails_verify(tmp_path: Path) -> None:
    model = saved_directory_model(tmp_path, version="v1")
    stored = model.path / "files" / "vocab" / "words.txt"
    stored.write_bytes(b"EVIL")
    (entry,) = model.info.files
    forged = msgspec.structs.replace(entry, size=4, sha256=hashlib.sha256(b"EVIL").hexdigest())
    rewrite(model, files=[forged])
    with pytest.raises(IntegrityError, match="vocab:v1: the manifest's digest does not match"):
        bl.models.get("vocab:v1").verify()


def test_an_extra_file_in_a_directory_model_fails_verify(tmp_path: Path) -> None:
    model = saved_directory_model(tmp_path)
    (model.path / "files" / "vocab" / "extra.py").write_text("print('hi')")
    with pytest.raises(IntegrityError, match=r"files not in the manifest: \['files/vocab/extra.py'\]"):
        model.load()


def test_a_digest_like_version_of_other_content_fails_verify(tmp_path: Path) -> None:
    model = saved_directory_model(tmp_path)
    renamed = model.path.with_name("e8651653c752443a")
    model.path.rename(renamed)
    rewrite(bl.models.Model(model.info, renamed), version="e8651653c752443a")
    with pytest.raises(IntegrityError, match="version 'e8651653c752443a' looks like a content digest"):
        bl.models.get("vocab:e8651653c752443a").verify()


def test_created_at_and_library_versions_are_not_content(tmp_path: Path) -> None:
    """A bento build copies a model with its own created_at; the copy still verifies."""
    model = saved_directory_model(tmp_path)
    rewrite(model, created_at=model.info.created_at.replace(year=2001), library_versions={})
    assert bl.models.get(model.tag).load().joinpath("words.txt").read_bytes() == b"a\nb\n"
