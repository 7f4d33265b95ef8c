"""bento_like.builders.oci against real tools: skopeo and umoci read what we build, runc runs it."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import tarfile
import time
from pathlib import Path

import httpx
import pytest

from bento_like.builders.oci import (
    BaseImage,
    ImageConfig,
    ImageError,
    LayerSpec,
    Layout,
    PipError,
    build_image,
    manylinux_platforms,
    pip_install,
)
from bento_like.builders.registry import push_image



def require(*binaries: str) -> None:
    missing = [b for b in binaries if shutil.which(b) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (see tests/builders/conftest.py)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 20.0) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return httpx.get(url, timeout=2)
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def blob(layout: Path, digest: str) -> bytes:
    return Layout(layout).read_blob(digest)


def layer_members(layout: Path, digest: str) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(blob(layout, digest)), mode="r:gz") as tar:
        return tar.getmembers()


def image_config(layout: Path, tag: str) -> dict:
    _, manifest = Layout(layout).image_manifest(tag)
    return json.loads(blob(layout, manifest["config"]["digest"]))


def skopeo_inspect(ref: str, *args: str) -> dict:
    require("skopeo")
    proc = subprocess.run(["skopeo", "inspect", *args, ref], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_layers_are_deterministic_tar_gzip(busybox_image) -> None:
    site_layer = busybox_image.layers[1]
    raw = blob(busybox_image.layout, site_layer.digest)
    # gzip header: magic, deflate, no flags (so no file name), mtime 0.
    assert raw[:4] == b"\x1f\x8b\x08\x00" and raw[4:8] == b"\0\0\0\0"
    assert site_layer.diff_id == "sha256:" + hashlib.sha256(gzip.decompress(raw)).hexdigest()
    members = layer_members(busybox_image.layout, site_layer.digest)
    names = [m.name for m in members]
    assert names == sorted(names)
    assert names == ["srv", "srv/www", "srv/www/assets", "srv/www/assets/app.js", "srv/www/index.html"]
    assert all(m.mtime == 0 and m.uname == "" and m.gname == "" for m in members)
    owners = {m.name: (m.uid, m.gid, m.mode) for m in members}
    assert owners["srv"] == (0, 0, 0o755)  # a parent the layer had to add stays root's
    assert owners["srv/www"] == (10001, 10001, 0o755)
    assert owners["srv/www/index.html"] == (10001, 10001, 0o644)


def test_same_inputs_give_the_same_digest_in_other_directories(tmp_path: Path, site: Path,
                                                               busybox_layer, httpd_config) -> None:
    """Another checkout: other paths, other mtimes, other umask -> byte-identical image."""
    other = tmp_path / "elsewhere" / "checkout"
    shutil.copytree(site, other)
    for path in other.rglob("*"):
        os.utime(path, (1_700_000_000, 1_700_000_000))
        path.chmod(0o775 if path.is_dir() else 0o664)
    config = httpd_config(8080)
    first = build_image(None, [busybox_layer, LayerSpec.directory(site, "/srv/www")], config, tmp_path / "a", "v1")
    second = build_image(None, [busybox_layer, LayerSpec.directory(other, "/srv/www")], config,
                         tmp_path / "b" / "deeper", "v1")
    assert first.manifest_digest == second.manifest_digest
    assert blob(first.layout, first.manifest_digest) == blob(second.layout, second.manifest_digest)
    # The epoch is an input: SOURCE_DATE_EPOCH moves mtimes and `created`, and so the digest.
    later = build_image(None, [busybox_layer, LayerSpec.directory(site, "/srv/www")], config, tmp_path / "c",
                        "v1", epoch=1_700_000_000)
    assert later.manifest_digest != first.manifest_digest
    assert image_config(later.layout, "v1")["created"] == "2023-11-14T22:13:20Z"
    assert {m.mtime for m in layer_members(later.layout, later.layers[1].digest)} == {1_700_000_000}


def test_skopeo_and_umoci_read_the_image_and_its_archive(tmp_path: Path, site: Path,
                                                         busybox_layer, httpd_config) -> None:
    require("skopeo", "umoci")
    image = build_image(None, [busybox_layer, LayerSpec.directory(site, "/srv/www", owner=(10001, 10001))],
                        httpd_config(8080), tmp_path / "layout", "v1", archive=tmp_path / "image.tar")
    info = skopeo_inspect(image.reference)
    assert info["Digest"] == image.manifest_digest
    assert info["Layers"] == [layer.digest for layer in image.layers]
    assert info["Labels"]["org.opencontainers.image.title"] == "busybox-httpd"
    assert info["Created"] == "1970-01-01T00:00:00Z"
    assert skopeo_inspect(f"oci-archive:{image.archive}:v1")["Digest"] == image.manifest_digest
    stat = subprocess.run(["umoci", "stat", "--image", f"{image.layout}:v1", "--json"], capture_output=True, text=True)
    assert stat.returncode == 0, stat.stderr
    assert len(json.loads(stat.stdout)["history"]) == 2
    # The archive is reproducible too.
    again = build_image(None, [busybox_layer, LayerSpec.directory(site, "/srv/www", owner=(10001, 10001))],
                        httpd_config(8080), tmp_path / "layout2", "v1", archive=tmp_path / "image2.tar")
    assert (tmp_path / "image.tar").read_bytes() == Path(again.archive).read_bytes()


def test_config_manifest_and_index(busybox_image) -> None:
    layout = busybox_image.layout
    config = image_config(layout, "v1")
    assert config["created"] == "1970-01-01T00:00:00Z"
    assert config["os"] == "linux" and config["architecture"] in ("amd64", "arm64")
    run = config["config"]
    assert run["User"] == "10001:10001"
    assert run["Entrypoint"] == ["/bin/busybox"] and run["Cmd"][0] == "httpd"
    assert list(run["ExposedPorts"]) == [f"{run['Cmd'][3].split(':')[1]}/tcp"]
    assert run["WorkingDir"] == "/srv/www"
    assert config["rootfs"]["diff_ids"] == [layer.diff_id for layer in busybox_image.layers]
    assert [h["created_by"] for h in config["history"]] == ["bento_like build: static busybox",
                                                             "bento_like build: /srv/www"]
    _, manifest = Layout(layout).image_manifest("v1")
    assert manifest["annotations"]["org.opencontainers.image.created"] == "1970-01-01T00:00:00Z"
    assert manifest["annotations"]["org.opencontainers.image.version"] == "1.0.0"
    index = json.loads((layout / "index.json").read_bytes())
    assert index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"] == "v1"
    assert json.loads((layout / "oci-layout").read_bytes()) == {"imageLayoutVersion": "1.0.0"}


def test_a_second_tag_in_the_same_layout_keeps_the_first(busybox_image, site: Path,
                                                         busybox_layer, httpd_config) -> None:
    (site / "index.html").write_text("v2\n")
    build_image(None, [busybox_layer, LayerSpec.directory(site, "/srv/www")], httpd_config(8080),
                busybox_image.layout, "v2")
    assert sorted(Layout(busybox_image.layout).tags()) == ["v1", "v2"]


def test_base_image_from_layout_and_archive_is_extended_not_rebuilt(tmp_path: Path, site: Path,
                                                                    busybox_layer) -> None:
    base = build_image(None, [busybox_layer], ImageConfig(env={"PATH": "/bin", "LANG": "C.UTF-8"}, cmd=["sh"],
                                                            user=None, labels={"tier": "base"}),
                       tmp_path / "base", "base", archive=tmp_path / "base.tar")
    app_layer = LayerSpec.directory(site, "/srv/www", owner=(10001, 10001))
    config = ImageConfig(env={"PATH": "/usr/bin:/bin", "APP": "1"}, entrypoint=["/bin/busybox", "httpd", "-f"],
                         labels={"tier": "app"})
    for source in (BaseImage(str(base.layout), "base"), BaseImage.parse(f"oci-archive:{base.archive}:base")):
        image = build_image(source, [app_layer], config, tmp_path / f"app-{source.kind}", "v1")
        assert [layer.source for layer in image.layers] == ["base", "built"]
        assert image.layers[0].digest == base.layers[0].digest
        assert Layout(image.layout).has_blob(base.layers[0].digest)
        built = image_config(image.layout, "v1")
        assert built["rootfs"]["diff_ids"] == [base.layers[0].diff_id, image.layers[1].diff_id]
        assert len(built["history"]) == 2
        run = built["config"]
        assert run["Env"] == ["PATH=/usr/bin:/bin", "LANG=C.UTF-8", "APP=1"]
        assert run["Entrypoint"] == ["/bin/busybox", "httpd", "-f"] and "Cmd" not in run  # Docker's rule
        assert run["Labels"] == {"tier": "app"} and run["User"] == "10001:10001"
        _, manifest = Layout(image.layout).image_manifest("v1")
        assert manifest["annotations"]["org.opencontainers.image.base.digest"] == base.manifest_digest
    # Same base, same layers: the same image whichever way the base came.
    digests = {build_image(s, [app_layer], config, tmp_path / f"again-{i}", "v1").manifest_digest
               for i, s in enumerate([BaseImage(str(base.layout), "base"),
                                      BaseImage.parse(f"oci-archive:{base.archive}:base")])}
    assert len(digests) == 1


def test_base_image_from_a_registry(tmp_path: Path, registry, repo_name: str, site: Path, busybox_layer) -> None:
    base = build_image(None, [busybox_layer], ImageConfig(user=None), tmp_path / "base", "base")
    push_image(base.layout, f"{registry.host}/{repo_name}:base", source_tag="base")
    cache = tmp_path / "cache"
    image = build_image(BaseImage.parse(f"{registry.host}/{repo_name}:base"),
                        [LayerSpec.directory(site, "/srv/www")], ImageConfig(), tmp_path / "app", "v1",
                        cache_dir=cache)
    assert image.layers[0].digest == base.layers[0].digest
    _, manifest = Layout(image.layout).image_manifest("v1")
    assert manifest["annotations"]["org.opencontainers.image.base.name"] == f"{registry.host}/{repo_name}:base"
    assert manifest["annotations"]["org.opencontainers.image.base.digest"] == base.manifest_digest
    assert Layout(cache / "bases").has_blob(base.layers[0].digest)  # pulled once, kept for the next build


def test_layer_cache_rebuilds_only_the_changed_layer(tmp_path: Path) -> None:
    """The layer order of a bento: deps, a model, code. A one-line code change recompresses only the code."""
    deps, model, code = tmp_path / "deps", tmp_path / "model", tmp_path / "code"
    for i in range(300):
        (deps / f"pkg{i % 30}").mkdir(parents=True, exist_ok=True)
        (deps / f"pkg{i % 30}" / f"mod{i}.py").write_text(f"VALUE = {i}\n" * 200)
    model.mkdir()
    (model / "weights.bin").write_bytes(hashlib.sha256(b"seed").digest() * (24 * 2**20 // 32))
    code.mkdir()
    (code / "service.py").write_text("def predict(x):\n    return x\n")
    specs = lambda: [LayerSpec.directory(deps, "/opt/deps"), LayerSpec.directory(model, "/opt/models/m"),  # noqa: E731
                     LayerSpec.directory(code, "/opt/app", owner=(10001, 10001))]
    cache = tmp_path / "cache"
    first = build_image(None, specs(), ImageConfig(), tmp_path / "out1", "v1", cache_dir=cache)
    assert [layer.source for layer in first.layers] == ["built", "built", "built"]
    (code / "service.py").write_text("def predict(x):\n    return 2 * x\n")
    second = build_image(None, specs(), ImageConfig(), tmp_path / "out2", "v2", cache_dir=cache)
    assert [layer.source for layer in second.layers] == ["cached", "cached", "built"]
    assert [layer.digest for layer in second.layers[:2]] == [layer.digest for layer in first.layers[:2]]
    assert second.layers[2].digest != first.layers[2].digest
    assert second.seconds < first.seconds / 2, (first.seconds, second.seconds)
    # Without the cache, the same bytes.
    uncached = build_image(None, specs(), ImageConfig(), tmp_path / "out3", "v2")
    assert uncached.manifest_digest == second.manifest_digest


def test_links_are_kept_and_preserve_keeps_modes_and_owners(tmp_path: Path) -> None:
    tree = tmp_path / "rootfs"
    (tree / "usr" / "bin").mkdir(parents=True)
    (tree / "usr" / "bin" / "tool").write_text("#!/bin/sh\n")
    os.chown(tree / "usr" / "bin" / "tool", 0, 42)  # before chmod: chown clears setuid
    (tree / "usr" / "bin" / "tool").chmod(0o4755)
    os.link(tree / "usr" / "bin" / "tool", tree / "usr" / "bin" / "tool-alias")
    (tree / "bin").symlink_to("usr/bin")
    (tree / "tmp").mkdir()
    (tree / "tmp").chmod(0o1777)
    image = build_image(None, [LayerSpec.directory(tree, "/", preserve=True)], ImageConfig(), tmp_path / "out", "v1")
    members = {m.name: m for m in layer_members(image.layout, image.layers[0].digest)}
    assert members["bin"].issym() and members["bin"].linkname == "usr/bin"
    assert members["usr/bin/tool"].mode == 0o4755 and members["usr/bin/tool"].gid == 42
    assert members["usr/bin/tool-alias"].islnk() and members["usr/bin/tool-alias"].linkname == "usr/bin/tool"
    assert members["tmp"].mode == 0o1777
    # Normalized (the default): setuid and odd groups are gone.
    plain = build_image(None, [LayerSpec.directory(tree / "usr", "/usr")], ImageConfig(), tmp_path / "o2", "v1")
    normal = {m.name: m for m in layer_members(plain.layout, plain.layers[0].digest)}
    assert (normal["usr/bin/tool"].mode, normal["usr/bin/tool"].gid) == (0o755, 0)


def test_files_layers_merge_and_bad_inputs_are_refused(tmp_path: Path) -> None:
    code = tmp_path / "code"
    code.mkdir()
    (code / "app.py").write_text("print('hi')\n")
    (code / "__pycache__").mkdir()
    (code / "__pycache__" / "app.cpython-311.pyc").write_bytes(b"\0")
    layer = LayerSpec.directory(code, "/app", exclude=["__pycache__"]) + LayerSpec.files(
        {"/app/bento.yaml": "name: demo\n", "/app/run.sh": b"#!/bin/sh\n"}, comment="manifest", mode=0o755)
    image = build_image(None, [layer], ImageConfig(), tmp_path / "out", "v1")
    names = [m.name for m in layer_members(image.layout, image.layers[0].digest)]
    assert names == ["app", "app/app.py", "app/bento.yaml", "app/run.sh"]
    os.mkfifo(code / "pipe")
    with pytest.raises(ImageError, match="special files"):
        build_image(None, [LayerSpec.directory(code, "/app")], ImageConfig(), tmp_path / "out", "v2")
    with pytest.raises(ImageError, match=r"'\.\.'"):
        build_image(None, [LayerSpec.files({"/app/../../etc/x": b""}, comment="x")], ImageConfig(),
                    tmp_path / "out", "v3")
    with pytest.raises(ImageError, match="no image tagged 'nope'"):
        build_image(BaseImage(str(tmp_path / "out"), "nope"), [], ImageConfig(), tmp_path / "out4", "v1")


def test_manylinux_platforms_cover_older_glibc() -> None:
    tags = manylinux_platforms("x86_64", "2.36")
    assert tags[0] == "manylinux_2_36_x86_64" and "manylinux_2_17_x86_64" in tags
    assert {"manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"} <= set(tags)
    assert "manylinux1_aarch64" not in manylinux_platforms("aarch64", "2.36")


def test_pip_install_for_the_image_python_is_reproducible(tmp_path: Path) -> None:
    """six from PyPI for CPython 3.11 on manylinux x86_64: no byte code, and the same layer twice."""
    digests = set()
    for name in ("a", "b"):
        target = pip_install(["six==1.16.0"], tmp_path / name / "site", python_version="3.11",
                             platform="linux/amd64", glibc="2.36")
        assert (target / "six.py").is_file() and (target / "six-1.16.0.dist-info" / "METADATA").is_file()
        assert not list(target.rglob("*.pyc"))
        image = build_image(None, [LayerSpec.directory(target, "/opt/site-packages", comment="python deps")],
                            ImageConfig(env={"PYTHONPATH": "/opt/site-packages"}), tmp_path / name / "out", "v1")
        digests.add(image.layers[0].digest)
    assert len(digests) == 1
    with pytest.raises(PipError, match="could not install for python 3.11 on linux/amd64"):
        pip_install(["six==0.0.0"], tmp_path / "none", python_version="3.11")


def test_console_scripts_get_the_image_interpreter(tmp_path: Path) -> None:
    from bento_like.builders.oci import _fix_shebangs

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "tool").write_bytes(b"#!/root/.pyenv/versions/3.11.7/bin/python3.11\nimport sys\n")
    (bin_dir / "shell").write_bytes(b"#!/bin/sh\necho hi\n")
    _fix_shebangs(bin_dir, "/usr/bin/env python3")
    assert (bin_dir / "tool").read_bytes() == b"#!/usr/bin/env python3\nimport sys\n"
    assert (bin_dir / "shell").read_bytes() == b"#!/bin/sh\necho hi\n"


def test_busybox_image_runs_under_runc_as_its_user(busybox_image, run_image) -> None:
    config = image_config(busybox_image.layout, "v1")["config"]
    port = int(config["Cmd"][3].split(":")[1])
    container = run_image(str(busybox_image.layout), "v1")
    response = wait_http(f"http://127.0.0.1:{port}/index.html")
    assert response.status_code == 200 and response.text == "hello from a layer\n"
    uid = subprocess.run(["runc", "exec", container, "/bin/busybox", "id", "-u"], capture_output=True, text=True)
    assert uid.stdout.strip() == "10001", uid.stderr


@pytest.mark.slow
def test_python_base_image_runs_a_python_app(tmp_path: Path, python_base_layout, run_image) -> None:
    """The shape of a bento image: debootstrapped Python base, deps from pip for its Python, then code."""
    base = python_base_layout
    site_packages = pip_install(["six==1.16.0"], tmp_path / "site", python_version=base.python_version,
                                glibc=base.glibc)
    port = free_port()
    app = tmp_path / "app"
    app.mkdir()
    (app / "serve.py").write_text(
        "import http.server, sys, six\n"
        "class H(http.server.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        "        body = f'six {six.__version__} on python {sys.version.split()[0]}'.encode()\n"
        "        self.send_response(200); self.end_headers(); self.wfile.write(body)\n"
        f"http.server.HTTPServer(('127.0.0.1', {port}), H).serve_forever()\n")
    started = time.perf_counter()
    image = build_image(base.image, [LayerSpec.directory(site_packages, "/opt/bento/site-packages", comment="deps"),
                                     LayerSpec.directory(app, "/opt/bento/src", owner=(10001, 10001), comment="code")],
                        ImageConfig(entrypoint=["python3", "/opt/bento/src/serve.py"], exposed_ports=[port],
                                    env={"PYTHONPATH": "/opt/bento/site-packages"}, working_dir="/opt/bento/src"),
                        tmp_path / "layout", "v1")
    print(f"python base: {base.timings}; app image on it: {time.perf_counter() - started:.2f} s")
    assert [layer.source for layer in image.layers] == ["base", "built", "built"]
    assert skopeo_inspect(image.reference)["Digest"] == image.manifest_digest
    run_image(str(image.layout), "v1")
    response = wait_http(f"http://127.0.0.1:{port}/", timeout=30)
    assert response.text == "six 1.16.0 on python 3.11.2"
