"""Real parts for the image tests: Debian's docker-registry on 127.0.0.1 with our own config, runc containers,
and a debootstrapped Python base image (slow; cached across sessions under $BENTO_LIKE_TEST_CACHE).

Every fixture skips, saying what to install, when its binary is missing; CI installs them all.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import httpx
import pytest

from bento_like.builders.base import debian_mirror
from bento_like.builders.oci import BaseImage, ImageConfig, ImageResult, LayerSpec, build_image

PYTHON_BASE_SUITE = "bookworm"
PYTHON_BASE_TAG = "python3.11"  # what `pkg base create --python 3.11` names it


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: needs a debootstrapped base image (about a minute, once per cache)")


def require(*binaries: str) -> None:
    missing = [b for b in binaries if shutil.which(b) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (apt-get install docker-registry skopeo umoci runc apache2-utils "
                    f"debootstrap busybox-static)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Registry:
    """`docker-registry serve` with a config of ours: loopback only, storage in a temp dir, deletes enabled."""

    def __init__(self, root: Path, htpasswd: Path | None = None, token: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"
        self.log_path = root / "registry.log"
        lines = [
            "version: 0.1",
            "log: {level: info, accesslog: {disabled: false}}",
            f"storage: {{filesystem: {{rootdirectory: {root / 'data'}}}, delete: {{enabled: true}}}}",
            f"http: {{addr: '{self.host}', secret: test-secret-{uuid.uuid4().hex}}}",
        ]
        if htpasswd is not None:
            lines.append(f"auth: {{htpasswd: {{realm: bento-like-test, path: {htpasswd}}}}}")
        if token is not None:
            lines.append("auth: {token: {" + ", ".join(f"{k}: '{v}'" for k, v in token.items()) + "}}")
        config = root / "config.yml"
        config.write_text("\n".join(lines) + "\n")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=self._log,
                                     stderr=subprocess.STDOUT)
        self._wait_ready()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/v2/", timeout=1).status_code in (200, 401):
                    return
            except httpx.TransportError:
                time.sleep(0.05)
        raise TimeoutError(f"docker-registry not ready after {timeout} s:\n{self.log()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """An anonymous registry shared by the session: tests use repository names of their own."""
    require("docker-registry")
    server = Registry(tmp_path_factory.mktemp("registry"))
    yield server
    server.stop()


@dataclass(frozen=True)
class Login:
    username: str
    password: str


@pytest.fixture(scope="session")
def auth_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Registry, Login]]:
    """A registry behind basic auth, from a bcrypt htpasswd file made by `htpasswd -Bbn`."""
    require("docker-registry", "htpasswd")
    root = tmp_path_factory.mktemp("auth-registry")
    login = Login("builder", "s3cret-" + uuid.uuid4().hex[:12])
    line = subprocess.run(["htpasswd", "-Bbn", login.username, login.password], check=True, capture_output=True,
                          text=True).stdout.strip()
    (root / "htpasswd").write_text(line + "\n")
    server = Registry(root, htpasswd=root / "htpasswd")
    yield server, login
    server.stop()


@pytest.fixture
def start_registry(tmp_path: Path) -> Iterator[Callable[..., Registry]]:
    """`start_registry(htpasswd=None, token=None)` -> a ready Registry of this test's own, stopped at teardown."""
    require("docker-registry")
    servers: list[Registry] = []

    def start(**options: object) -> Registry:
        root = tmp_path / f"registry-{len(servers)}"
        root.mkdir()
        servers.append(Registry(root, **options))  # type: ignore[arg-type]
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def repo_name(request: pytest.FixtureRequest) -> str:
    """A repository name unique to the test, so blob counts do not depend on other tests."""
    return "t/" + request.node.name.lower().replace("_", "-").strip("-")[:40] + "-" + uuid.uuid4().hex[:6]


# --- images -------------------------------------------------------------------------------------------------------


@pytest.fixture
def busybox_layer() -> LayerSpec:
    """A static busybox as /bin/busybox plus /bin/sh: the smallest base that can run a shell and an HTTP server."""
    busybox = Path("/bin/busybox")
    if not busybox.is_file() or not _is_static_elf(busybox):
        pytest.skip("needs a static /bin/busybox (apt-get install busybox-static)")
    return LayerSpec.files({"/bin/busybox": busybox, "/bin/sh": busybox}, comment="static busybox")


def _is_static_elf(path: Path) -> bool:
    """An ELF executable without a PT_INTERP program header needs no dynamic loader: it runs on an empty rootfs."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2:  # 64-bit only
        return False
    order = "<" if data[5] == 1 else ">"
    phoff, = struct.unpack_from(order + "Q", data, 0x20)
    phentsize, phnum = struct.unpack_from(order + "HH", data, 0x36)
    return all(struct.unpack_from(order + "I", data, phoff + i * phentsize)[0] != 3 for i in range(phnum))


@pytest.fixture
def httpd_config() -> Callable[[int], ImageConfig]:
    """`httpd_config(port)`: run busybox httpd on 127.0.0.1:port serving /srv/www."""
    return _httpd_config


def _httpd_config(port: int) -> ImageConfig:
    return ImageConfig(entrypoint=["/bin/busybox"], cmd=["httpd", "-f", "-p", f"127.0.0.1:{port}", "-h", "/srv/www"],
                       env={"PATH": "/bin"}, exposed_ports=[port], working_dir="/srv/www",
                       annotations={"org.opencontainers.image.title": "busybox-httpd",
                                    "org.opencontainers.image.version": "1.0.0",
                                    "org.opencontainers.image.source": "https://example.invalid/bento_like"})


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A little web site: the 'app' layer of the busybox images."""
    www = tmp_path / "site"
    (www / "assets").mkdir(parents=True)
    (www / "index.html").write_text("hello from a layer\n")
    (www / "assets" / "app.js").write_text("console.log('v1')\n")
    return www


@pytest.fixture
def busybox_image(tmp_path: Path, site: Path, busybox_layer: LayerSpec) -> ImageResult:
    """A two-layer image (busybox, then the site owned by 10001) serving /srv/www on a free port."""
    return build_image(None, [busybox_layer, LayerSpec.directory(site, "/srv/www", owner=(10001, 10001))],
                       _httpd_config(free_port()), tmp_path / "layout", "v1")


# --- running images -------------------------------------------------------------------------------------------------


@pytest.fixture
def run_image(tmp_path: Path) -> Iterator[Callable[..., str]]:
    """`run_image(layout_dir, tag, env={...})` -> container id: umoci unpack, no terminal, the host's network,
    runc run in the background, with `env` added to the image's. `args` replaces the process's arguments,
    `host_namespaces` lists the namespaces shared with the host (network by default) and `mounts` maps
    host directories to paths in the container. Every container started is deleted at teardown."""
    require("umoci", "runc")
    if os.geteuid() != 0:
        pytest.skip("runc needs root here")
    started: list[str] = []

    def run(layout: str, tag: str, env: dict[str, str] | None = None, *, args: list[str] | None = None,
            host_namespaces: tuple[str, ...] = ("network",), mounts: dict[str, Path] | None = None) -> str:
        bundle = tmp_path / f"bundle-{len(started)}"
        subprocess.run(["umoci", "unpack", "--image", f"{layout}:{tag}", str(bundle)], check=True,
                       capture_output=True)
        config_path = bundle / "config.json"
        config = json.loads(config_path.read_text())
        config["process"]["terminal"] = False
        config["process"]["env"] = [*config["process"].get("env", []), *(f"{k}={v}" for k, v in (env or {}).items())]
        if args is not None:
            config["process"]["args"] = args
        config["linux"]["namespaces"] = [n for n in config["linux"]["namespaces"] if n["type"] not in host_namespaces]
        for destination, source in (mounts or {}).items():
            config["mounts"].append({"destination": destination, "type": "bind", "source": str(source),
                                     "options": ["rbind", "rw"]})
        config_path.write_text(json.dumps(config))
        container = f"bento-like-test-{uuid.uuid4().hex[:10]}"
        log = open(tmp_path / f"{container}.log", "wb")
        subprocess.Popen(["runc", "run", "--bundle", str(bundle), container], stdout=log, stderr=subprocess.STDOUT,
                         stdin=subprocess.DEVNULL)
        started.append(container)
        return container

    yield run
    for container in started:
        subprocess.run(["runc", "delete", "-f", container], capture_output=True)


# --- a debootstrapped Python base -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PythonBase:
    """A Debian minbase + python3 image in an OCI layout, and what pip must target to install into it."""

    layout: Path
    tag: str
    python_version: str
    glibc: str
    timings: dict[str, float]

    @property
    def image(self) -> BaseImage:
        return BaseImage(str(self.layout), self.tag)


def test_cache_dir() -> Path:
    return Path(os.environ.get("BENTO_LIKE_TEST_CACHE") or "~/.cache/bento_like-tests").expanduser()


@pytest.fixture(scope="session")
def python_base_layout() -> PythonBase:
    """`pkg base create --python 3.11` (debootstrap: Debian bookworm minbase + python3, one layer), run as a user
    runs it.

    Built once and cached under $BENTO_LIKE_TEST_CACHE (default ~/.cache/bento_like-tests), keyed by the suite,
    the mirror and the layer format, and guarded by a file lock so that parallel sessions build it once. Tests
    that use it are marked slow: the first build takes about a minute.
    """
    require("debootstrap")
    if os.geteuid() != 0:
        pytest.skip("debootstrap needs root")
    mirror = debian_mirror(PYTHON_BASE_SUITE)
    key = hashlib.sha256(f"{PYTHON_BASE_SUITE}|pkg-base-create|{mirror}|layer-2".encode()).hexdigest()[:16]
    root = test_cache_dir() / f"python-base-{PYTHON_BASE_SUITE}-{key}"
    root.mkdir(parents=True, exist_ok=True)
    layout, done, timings_path = root / "layout", root / "layout.done", root / "timings.json"
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(layout, ignore_errors=True)
            started = time.perf_counter()
            proc = subprocess.run(
                [sys.executable, "-m", "bento_like", "base", "create", "--python", "3.11", "--output", str(layout)],
                capture_output=True, text=True, timeout=900)
            if proc.returncode != 0:
                pytest.fail(f"pkg base create failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
            assert proc.stdout.strip() == f"oci:{layout}:{PYTHON_BASE_TAG}", proc.stdout
            timings = {"base_create_s": round(time.perf_counter() - started, 1),
                       "layout_mb": round(sum(f.stat().st_size for f in layout.rglob("*") if f.is_file()) / 1e6, 1)}
            timings_path.write_text(json.dumps(timings))
            done.touch()
    return PythonBase(layout, PYTHON_BASE_TAG, "3.11", "2.36", json.loads(timings_path.read_text()))


@pytest.fixture
def tiny_base(tmp_path: Path) -> Callable[[str], str]:
    """`tiny_base("linux/arm64")` -> `oci:DIR:TAG` of a one-file image for that platform: a base to build on
    (and inspect), never to run, so any platform will do on any host."""

    def make(platform: str) -> str:
        layout = tmp_path / f"tiny-base-{platform.replace('/', '-')}"
        # an empty python3.11: containerize checks that the base has the bento's Python before it builds
        layer = LayerSpec.files({"/etc/tiny-base": platform, "/usr/bin/python3.11": ""}, comment="tiny base")
        build_image(None, [layer], ImageConfig(user=None, platform=platform), layout, "base")
        return f"oci:{layout}:base"

    return make
