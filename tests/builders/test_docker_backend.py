"""`pkg containerize --backend docker`: the rendered Dockerfile, the error without a daemon, and (slow) a real build
through the docker SDK against podman's Docker-compatible API, run with podman and asked for a prediction."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest
from click.testing import CliRunner

import bento_like as bl
from bento_like.bentos import BentoError, BentoStore
from bento_like.builders.bento import build_bento
from bento_like.builders.containerize import containerize, image_config
from bento_like.builders.docker_backend import (
    DockerBackendError,
    DockerUnavailableError,
    build_context,
    build_with_docker,
    render_dockerfile,
)
from bento_like.builders.registry import push_image
from bento_like.cli.main import cli

from live_server import free_port

SERVICE = '''
import numpy as np
import bento_like as bl


@bl.service(name="scaler")
class Scaler:
    weights = bl.model("weights:latest")
    bias = bl.model("bias:latest")

    @bl.api
    def predict(self, x: np.ndarray) -> np.ndarray:
        return x * self.weights["scale"] + self.bias["shift"]
'''

BASE = "127.0.0.1:5000/base:bookworm-python3"


def make_bento(project: Path, base_image: str | None = None) -> str:
    bl.models.save("weights", {"scale": 3.0}, framework="pickle")
    bl.models.save("bias", {"shift": 1.0}, framework="pickle")
    project.mkdir()
    (project / "service.py").write_text(SERVICE)
    config = "service: service.py:Scaler\nlabels: {team: fraud, cost: '$HOME \"quoted\"'}\n"
    if base_image:
        config += f"base_image: '{base_image}'\n"
    (project / "bentofile.yaml").write_text(config)
    return build_bento(project).bento.tag


@pytest.fixture
def bento(tmp_path: Path, home: Path) -> str:
    return make_bento(tmp_path / "proj")


def test_dockerfile_has_the_daemonless_layers_and_config(bento: str) -> None:
    stored = BentoStore().get(bento)
    dockerfile = render_dockerfile(stored, BASE)
    lines = dockerfile.splitlines()
    instructions = [line.split()[0] for line in lines if line and not line.startswith(("#", " "))]
    assert instructions[:6] == ["FROM", "COPY", "COPY", "COPY", "COPY", "COPY"]  # deps, runtime, 2 models, code
    assert f"FROM --platform=linux/amd64 {BASE}" in lines
    copies = [line for line in lines if line.startswith("COPY ")]
    assert copies[0] == "COPY site-packages/ /opt/bento/site-packages/"
    assert copies[1] == "COPY runtime/ /opt/bento/site-packages/"
    models = sorted(m.tag for m in stored.info.models)
    assert copies[2:4] == [f"COPY models/{m.replace(':', '/')}/ /home/bento/bento/models/{m.replace(':', '/')}/"
                           for m in models]
    assert copies[4] == "COPY bento/ /home/bento/bento/"
    assert "USER 10001:10001" in lines
    assert "EXPOSE 3000" in lines
    assert "WORKDIR /home/bento/bento" in lines
    entrypoint = next(line for line in lines if line.startswith("ENTRYPOINT "))
    assert json.loads(entrypoint.removeprefix("ENTRYPOINT ")) == list(image_config(stored.info).entrypoint)
    assert 'PYTHONPATH="/opt/bento/site-packages"' in dockerfile
    assert 'BENTO_LIKE_PORT="3000"' in dockerfile
    # labels are quoted so that a `$` is not expanded as a build variable
    assert '"dev.bento_like.label.cost"="\\$HOME \\"quoted\\""' in dockerfile
    assert f'"org.opencontainers.image.version"="{stored.info.version}"' in dockerfile
    assert "RUN" not in instructions  # the build needs no network and no Python of its own


def test_local_oci_base_is_refused_with_what_to_do(bento: str) -> None:
    stored = BentoStore().get(bento)
    with pytest.raises(DockerBackendError, match=r"is a local OCI image: push it \(pkg push oci:/b:t"):
        render_dockerfile(stored, "oci:/b:t")
    with pytest.raises(DockerBackendError, match="names no base image"):
        render_dockerfile(stored)


def test_no_daemon_is_a_clear_error(bento: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("docker")
    socket_path = tmp_path / "nothing-here.sock"
    monkeypatch.setenv("DOCKER_HOST", f"unix://{socket_path}")
    with pytest.raises(DockerUnavailableError) as caught:
        build_with_docker(bento, base=BASE)
    message = str(caught.value)
    assert isinstance(caught.value, BentoError)
    assert f"no Docker daemon is reachable at unix://{socket_path} (from DOCKER_HOST)" in message
    assert "the default --backend oci, which needs no daemon" in message
    result = CliRunner().invoke(cli, ["containerize", bento, "--backend", "docker", "--base", BASE])
    assert result.exit_code != 0
    assert f"no Docker daemon is reachable at unix://{socket_path}" in result.output


def test_flags_of_the_oci_backend_are_refused_with_docker(bento: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["containerize", bento, "--backend", "docker", "--base", BASE,
                                      "--archive", str(tmp_path / "x.tar"), "--push", "127.0.0.1:1/r:t"])
    assert result.exit_code == 2
    assert "--archive, --push only apply to --backend oci" in result.output
    assert not (tmp_path / "x.tar").exists()


# --- a real build against podman's Docker-compatible API (slow) ---------------------------------------------------


class Podman:
    """`podman system service` on a socket of its own, with private storage (vfs), runroot and tmpdir, so that
    nothing touches the host's global container storage; `run` uses the same storage. Never the bridge network."""

    def __init__(self, root: Path, insecure_registry: str) -> None:
        self.root = root
        self.socket = root / "podman.sock"
        registries = root / "registries.conf"
        registries.write_text('unqualified-search-registries = []\n\n'
                              f'[[registry]]\nlocation = "{insecure_registry}"\ninsecure = true\n')
        self.env = {**os.environ, "CONTAINERS_REGISTRIES_CONF": str(registries)}
        self.global_args = ["podman", "--root", str(root / "storage"), "--runroot", str(root / "run"),
                            "--tmpdir", str(root / "tmp"), "--storage-driver", "vfs", "--runtime", "runc",
                            "--cgroup-manager", "cgroupfs", "--events-backend", "file"]
        self.log_path = root / "service.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([*self.global_args, "system", "service", "--time=0", f"unix://{self.socket}"],
                                     env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        self._wait_ready()

    @property
    def docker_host(self) -> str:
        return f"unix://{self.socket}"

    def _wait_ready(self, timeout: float = 60.0) -> None:
        import docker

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"podman system service exited with {self.proc.returncode}:\n{self.log()}")
            if self.socket.exists():
                try:
                    docker.DockerClient(base_url=self.docker_host, timeout=5).ping()
                    return
                except docker.errors.DockerException:
                    pass
            time.sleep(0.2)
        raise TimeoutError(f"podman system service not answering after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def podman(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.global_args, *args], env=self.env, capture_output=True, text=True, check=check,
                              timeout=300)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture
def podman(registry) -> Iterator[Podman]:  # type: ignore[no-untyped-def]
    if shutil.which("podman") is None or shutil.which("runc") is None:
        pytest.skip("needs podman and runc (apt-get install podman runc)")
    if os.geteuid() != 0:
        pytest.skip("podman with runc and private vfs storage needs root here")
    pytest.importorskip("docker")
    # short: podman refuses a runroot over 50 characters (conmon's attach socket lives there)
    root = Path(tempfile.mkdtemp(prefix="bento-podman-"))
    service = Podman(root, registry.host)
    yield service
    service.stop()
    # vfs keeps a full copy of the root filesystem per layer: do not leave a gigabyte behind in tmp
    service.podman("system", "reset", "--force", check=False)
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_build_through_podman_api_run_and_predict(tmp_path: Path, home: Path, python_base_layout, registry,
                                                   podman: Podman, monkeypatch: pytest.MonkeyPatch) -> None:
    import docker

    base = f"{registry.host}/docker-backend/base:{python_base_layout.tag}"
    push_image(python_base_layout.layout, base, source_tag=python_base_layout.tag)
    tag = make_bento(tmp_path / "proj", base_image=base)
    monkeypatch.setenv("DOCKER_HOST", podman.docker_host)

    started = time.perf_counter()
    built = CliRunner().invoke(cli, ["containerize", tag, "--backend", "docker", "--tag", "v1"])
    build_s = time.perf_counter() - started
    assert built.exit_code == 0, built.output
    image = built.output.splitlines()[-1]
    assert image == "scaler:v1", built.output

    client = docker.DockerClient(base_url=podman.docker_host)
    attrs = client.images.get(image).attrs
    expected = image_config(BentoStore().get(tag).info)
    config = attrs["Config"]
    assert config["User"] == "10001:10001"
    assert set(config["ExposedPorts"]) == {"3000/tcp"}
    assert config["Entrypoint"] == list(expected.entrypoint)
    assert not config.get("Cmd")  # the base's `python3` is not appended to the entrypoint
    assert config["WorkingDir"] == "/home/bento/bento"
    env = dict(item.split("=", 1) for item in config["Env"])
    assert {k: env[k] for k in expected.env} == dict(expected.env)
    assert env["PATH"].startswith("/usr/local/sbin")  # the base's PATH survives, as in the daemonless image
    assert config["Labels"]["dev.bento_like.label.team"] == "fraud"
    assert config["Labels"]["dev.bento_like.label.cost"] == '$HOME "quoted"'
    assert config["Labels"]["org.opencontainers.image.version"] == tag.split(":")[1]
    # base, deps, runtime, two models, code + manifest: the daemonless image's layers
    assert len(attrs["RootFS"]["Layers"]) == 1 + 5

    port = free_port()
    run = podman.podman("run", "-d", "--network", "host", "--ulimit", "nofile=20000:20000", "--ulimit",
                        "nproc=4096:4096", "-e", f"BENTO_LIKE_PORT={port}", image)
    container = run.stdout.strip()
    try:
        answer = None
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and answer is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    answer = httpx.post(f"http://127.0.0.1:{port}/predict", json={"x": [1.0, 2.0]}, timeout=10)
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        logs = podman.podman("logs", container, check=False)
        assert answer is not None, f"the container never became ready:\n{logs.stdout}\n{logs.stderr}"
        assert answer.status_code == 200 and answer.json() == [4.0, 7.0], answer.text
        whoami = podman.podman("exec", container, "python3", "-c", "import os; print(os.getuid())")
        assert whoami.stdout.strip() == "10001"
        listing = podman.podman("exec", container, "python3", "-c", LIST_APP_FILES).stdout
        in_container = set(listing.splitlines())
    finally:
        podman.podman("rm", "-f", "-t", "5", container, check=False)
    # the same files, modes and owners as the daemonless image's layers
    daemonless = containerize(tag, base=f"oci:{python_base_layout.layout}:{python_base_layout.tag}",
                              output=tmp_path / "oci")
    assert any(line.startswith("/home/bento/bento/src/service.py f 644 0:0 ") for line in in_container)
    assert len(in_container) > 500  # numpy and friends, not an empty listing
    assert in_container == layer_listing(daemonless)
    print(f"docker backend via podman: build {build_s:.1f} s")


APP_DIRS = ("/opt/bento", "/home/bento")
# Every entry under APP_DIRS as "path kind mode uid:gid size" (size only for files), run inside the container.
LIST_APP_FILES = f"""
import os, stat
for top in {APP_DIRS!r}:
    for folder, dirs, files in os.walk(top):
        for path in [folder] + [os.path.join(folder, name) for name in files]:
            st = os.lstat(path)
            kind = "d" if stat.S_ISDIR(st.st_mode) else "l" if stat.S_ISLNK(st.st_mode) else "f"
            size = st.st_size if kind == "f" else "?"
            print(path, kind, format(stat.S_IMODE(st.st_mode), "o"), f"{{st.st_uid}}:{{st.st_gid}}", size)
"""


def layer_listing(result) -> set[str]:  # type: ignore[no-untyped-def]
    """LIST_APP_FILES's lines for the daemonless image, read from its own (non-base) layers."""
    kinds = {tarfile.DIRTYPE: "d", tarfile.REGTYPE: "f", tarfile.SYMTYPE: "l", tarfile.LNKTYPE: "f"}
    entries: dict[str, tuple[str, int, str, int | None]] = {}
    for layer in result.layers:
        if layer.source == "base":
            continue
        blob = result.layout / "blobs" / "sha256" / layer.digest.split(":")[1]
        with tarfile.open(blob, "r:gz") as tar:
            for member in tar:
                path = "/" + member.name.rstrip("/")
                if any(path == d or path.startswith(d + "/") for d in APP_DIRS):
                    size = member.size if member.isreg() else None
                    if member.islnk():
                        size = entries["/" + member.linkname][3]
                    entries[path] = (kinds[member.type], member.mode & 0o7777, f"{member.uid}:{member.gid}", size)
    return {f"{p} {k} {m:o} {o} {s if s is not None else '?'}" for p, (k, m, o, s) in entries.items()}


def test_build_context_holds_what_the_dockerfile_copies(bento: str, tmp_path: Path) -> None:
    stored = BentoStore().get(bento)
    context = build_context(stored, tmp_path / "context")
    assert (context / "site-packages" / "numpy").is_dir()
    assert not (context / "site-packages" / ".complete").exists()
    assert (context / "runtime" / "bento_like" / "serving").is_dir()
    assert not (context / "runtime" / "bento_like" / "builders").exists()
    for model in stored.info.models:
        assert any((context / "models" / model.tag.replace(":", "/")).iterdir())
    for relative in ("bento.yaml", "openapi.json", "env/requirements.lock.txt", "src/service.py"):
        assert (context / "bento" / relative).is_file(), relative
    modes = {oct(p.stat().st_mode & 0o777) for p in context.rglob("*") if not p.is_symlink()}
    assert modes <= {"0o755", "0o644"}
