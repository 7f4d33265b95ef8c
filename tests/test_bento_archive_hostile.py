"""Hostile bento archives: bento.yaml is read without aliases and only up to a size, every member is checked
against it (and the models it names) before a byte is written, and the models inside are checked as a model
import checks them. Each refusal is one BentoError, and leaves the store and its staging area empty."""

from __future__ import annotations

import hashlib
import os
import resource
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import msgspec
import pytest
from archive_helpers import alias_bomb, file_size_limit, tar_of
from click.testing import CliRunner

import bento_like as bl
from bento_like.bentos import (
    BentoError,
    BentoManifest,
    BentoStore,
    BuildInfo,
    FileEntry,
    ModelEntry,
    PythonEnv,
    encode_manifest,
)
from bento_like.cli.main import cli
from bento_like.models import ModelInfo
from bento_like.models._manifest import encode

MiB = 2**20
PREFIX = "svc/v1"


def manifest_for(src: dict[str, bytes], model: bl.models.Model) -> BentoManifest:
    return BentoManifest(
        name="svc", version="v1", service="service.py:Svc", service_name="svc", apis=(),
        models=(
            ModelEntry(attr="w", tag=model.tag, framework="files", digest=model.info.digest, size=model.info.size),
        ),
        python=PythonEnv(version="3.11"),
        files=tuple(FileEntry(p, len(d), hashlib.sha256(d).hexdigest()) for p, d in sorted(src.items())),
        build=BuildInfo(bento_like_version="0", python_version="3.11", created_at="2026-01-01T00:00:00Z"),
    )


@pytest.fixture
def good(home: Path, tmp_path: Path) -> tuple[str, list[tuple[str, bytes]]]:
    """A bento's exported members (bento.yaml first) and its model's tag; the store is emptied again."""
    source = tmp_path / "weights.txt"
    source.write_bytes(b"0.5\n")
    model = bl.models.get(bl.models.save("weights", source))
    src = {"src/service.py": b"x = 1\n"}
    root = BentoStore().root / "svc" / "v1"
    (root / "src").mkdir(parents=True)
    (root / "src" / "service.py").write_bytes(src["src/service.py"])
    shutil.copytree(model.path, root / "models" / model.name / model.version)
    (root / "bento.yaml").write_bytes(encode_manifest(manifest_for(src, model)))
    archive = BentoStore().export("svc:v1", tmp_path / "good.tar")
    shutil.rmtree(root.parent)
    with tarfile.open(archive) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]
    assert members[0][0] == f"{PREFIX}/bento.yaml"
    return model.tag, members


def refused(tmp_path: Path, members: list[tuple[str, bytes | int]], match: str) -> None:
    archive = tar_of(tmp_path / "hostile.tar.gz", members, "w:gz")
    store = BentoStore()
    with pytest.raises(BentoError, match=match):
        store.import_(archive)
    assert store.list() == []
    assert not (store.root / ".staging").exists() or not any((store.root / ".staging").iterdir())


def edit(members: list[tuple[str, bytes]], name: str, change) -> list[tuple[str, bytes]]:
    return [(n, change(d) if n == name else d) for n, d in members]


def test_a_good_bento_archive_imports(good: tuple[str, list], tmp_path: Path) -> None:
    _, members = good
    bento = BentoStore().import_(tar_of(tmp_path / "ok.tar.gz", members, "w:gz"))
    assert bento.tag == "svc:v1"
    bento.verify()


# item 3 ----------------------------------------------------------------------------------------------


def test_alias_in_bento_yaml_is_refused(good: tuple[str, list], tmp_path: Path) -> None:
    _, members = good
    bomb = ("reports:\n" + alias_bomb(3)).encode()
    refused(tmp_path, edit(members, f"{PREFIX}/bento.yaml", lambda d: d.replace(b"reports: {}\n", bomb)),
            r"bento.yaml: .*anchors and aliases")


def test_a_bento_yaml_over_the_limit_is_refused_before_it_is_read(good: tuple[str, list], tmp_path: Path) -> None:
    refused(tmp_path, [(f"{PREFIX}/bento.yaml", 64 * MiB)], r"bento.yaml is 67108864 bytes, over the 16 MiB limit")


def test_the_issue_alias_bomb_is_one_error_line_on_import_and_get(good: tuple[str, list], tmp_path: Path) -> None:
    """Nine levels expand to 10**9 items; the commands run under a 2 GiB address-space limit so that a reader
    that expands them fails fast instead of taking the machine."""
    _, members = good
    bomb = ("reports:\n" + alias_bomb(9)).encode()
    members = edit(members, f"{PREFIX}/bento.yaml", lambda d: d.replace(b"reports: {}\n", bomb))
    archive = tar_of(tmp_path / "bomb.tar", members)

    def pkg(*args: str) -> subprocess.CompletedProcess[str]:
        def limit() -> None:
            resource.setrlimit(resource.RLIMIT_AS, (2**31, 2**31))

        return subprocess.run([sys.executable, "-m", "bento_like", *args], capture_output=True, text=True,
                              timeout=120, preexec_fn=limit, env=os.environ)

    imported = pkg("import", str(archive))
    assert imported.returncode == 1 and imported.stderr.startswith("Error: "), imported.stderr
    assert len(imported.stderr.splitlines()) == 1 and "anchors and aliases" in imported.stderr
    assert BentoStore().list() == []
    # a bento installed by a version that let it in
    installed = BentoStore().root / "svc" / "v1"
    installed.mkdir(parents=True)
    (installed / "bento.yaml").write_bytes(members[0][1])
    shown = pkg("get", "svc:v1")
    assert shown.returncode == 1 and shown.stderr.startswith("Error: "), shown.stderr
    assert len(shown.stderr.splitlines()) == 1 and "anchors and aliases" in shown.stderr


# item 6 ----------------------------------------------------------------------------------------------


def test_a_large_member_bento_yaml_does_not_list_is_refused_unwritten(good: tuple[str, list], tmp_path: Path) -> None:
    _, members = good
    with file_size_limit(16 * MiB):
        refused(tmp_path, [*members, (f"{PREFIX}/src/zeros", 256 * MiB)], r"'svc/v1/src/zeros' is not in bento.yaml")


def test_a_model_the_manifest_does_not_name_is_refused_unwritten(good: tuple[str, list], tmp_path: Path) -> None:
    _, members = good
    with file_size_limit(16 * MiB):
        refused(tmp_path, [*members, (f"{PREFIX}/models/evil/v1/zeros", 256 * MiB)],
                r"'svc/v1/models/evil/v1/zeros' is not in bento.yaml")


def test_model_files_past_the_models_declared_size_are_refused_unwritten(
    good: tuple[str, list], tmp_path: Path
) -> None:
    tag, members = good
    model_dir = f"{PREFIX}/models/{tag.replace(':', '/')}"
    with file_size_limit(16 * MiB):
        refused(tmp_path, [*members, (f"{model_dir}/files/zeros", 256 * MiB)],
                rf"'{model_dir}/files/zeros' would take model {tag} past the 4 bytes bento.yaml gives it")


def test_bento_yaml_must_come_first(good: tuple[str, list], tmp_path: Path) -> None:
    _, members = good
    refused(tmp_path, [*members[1:], members[0]], "the first file must be <name>/<version>/bento.yaml")


# item 10: the models inside are held to their own digests ---------------------------------------------


def test_a_model_with_edited_metadata_is_refused(good: tuple[str, list], tmp_path: Path) -> None:
    tag, members = good
    name = f"{PREFIX}/models/{tag.replace(':', '/')}/manifest.yaml"

    def change(data: bytes) -> bytes:
        info = msgspec.yaml.decode(data, type=ModelInfo)
        return encode(msgspec.structs.replace(info, metadata={"approved": True}))

    refused(tmp_path, edit(members, name, change), rf"model {tag}: .*the manifest's digest does not match")


def test_an_extra_file_in_a_model_is_refused(good: tuple[str, list], tmp_path: Path) -> None:
    tag, members = good
    # bento.yaml gives the model room for it, so only the model's own file list can refuse it
    roomy = edit(members, f"{PREFIX}/bento.yaml", lambda d: d.replace(b"size: 4\n", b"size: 100\n"))
    extra = (f"{PREFIX}/models/{tag.replace(':', '/')}/files/x.py", b"1")
    refused(tmp_path, [*roomy, extra], rf"model {tag}: the manifest does not match the files: not in the manifest \['fil")


# item 12 ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", [["src/a", "src/a/b"], ["src/a/b", "src/a"]])
def test_a_file_and_a_directory_of_one_name(order: list[str], good: tuple[str, list], tmp_path: Path) -> None:
    tag, members = good
    model = bl.models.get(tag)
    src = {path: b"x" for path in order}
    manifest = encode_manifest(manifest_for(src, model))
    models = [(n, d) for n, d in members if "/models/" in n]
    hostile = [(f"{PREFIX}/bento.yaml", manifest), *models, *((f"{PREFIX}/{p}", d) for p, d in src.items())]
    refused(tmp_path, hostile, r"'svc/v1/src/a' is both a file and a directory")
    archive = tar_of(tmp_path / "cli.tar", hostile)
    result = CliRunner().invoke(cli, ["import", str(archive)])
    assert result.exit_code == 1 and type(result.exception) is SystemExit
    assert result.output.startswith("Error: ") and len(result.output.splitlines()) == 1


def test_verify_covers_the_models(good: tuple[str, list], tmp_path: Path) -> None:
    tag, members = good
    bento = BentoStore().import_(tar_of(tmp_path / "ok.tar", members))
    (bento.path / "models" / tag.replace(":", "/") / "files" / "extra.py").write_text("print('hi')")
    with pytest.raises(BentoError, match=rf"bento svc:v1: model {tag}: .*files not in the manifest"):
        bento.verify()
    with pytest.raises(BentoError, match="files not in the manifest"):
        BentoStore().export("svc:v1", tmp_path / "out.tar")
