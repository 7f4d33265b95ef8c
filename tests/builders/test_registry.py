"""bento_like.builders.registry against Debian's docker-registry (distribution 2.8), checked with skopeo."""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
import uuid
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from bento_like.builders.oci import ImageConfig, LayerSpec, Layout, build_image
from bento_like.builders.registry import (
    AuthError,
    BlobProgress,
    Credentials,
    Reference,
    RegistryClient,
    RegistryError,
    load_credentials,
    pull_image,
    push_image,
)


def require(*binaries: str) -> None:
    missing = [b for b in binaries if shutil.which(b) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (see tests/builders/conftest.py)")


def image_blobs(layout: Path, tag: str) -> list[str]:
    _, manifest = Layout(layout).image_manifest(tag)
    return [*(layer["digest"] for layer in manifest["layers"]), manifest["config"]["digest"]]


def skopeo(*args: str) -> str:
    require("skopeo")
    proc = subprocess.run(["skopeo", *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_push_then_skopeo_pulls_the_same_image(tmp_path: Path, registry, repo_name: str, busybox_image) -> None:
    events: list[BlobProgress] = []
    report = push_image(busybox_image.layout, f"{registry.host}/{repo_name}:v1", source_tag="v1",
                        progress=events.append)
    blobs = image_blobs(busybox_image.layout, "v1")
    assert report.manifest_digest == busybox_image.manifest_digest
    assert report.uploaded == blobs and report.existing == [] and report.mounted == []
    assert {e.digest for e in events if e.action == "upload" and e.done == e.total} == set(blobs)
    head = httpx.head(f"{registry.url}/v2/{repo_name}/manifests/v1",
                      headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    assert head.headers["Docker-Content-Digest"] == busybox_image.manifest_digest

    skopeo("copy", "--src-tls-verify=false", f"docker://{registry.host}/{repo_name}:v1", f"oci:{tmp_path / 'back'}:v1")
    assert json.loads(skopeo("inspect", f"oci:{tmp_path / 'back'}:v1"))["Digest"] == busybox_image.manifest_digest
    assert image_blobs(tmp_path / "back", "v1") == blobs
    remote = json.loads(skopeo("inspect", "--tls-verify=false", f"docker://{registry.host}/{repo_name}:v1"))
    assert remote["Digest"] == busybox_image.manifest_digest


def test_a_second_push_uploads_no_blob(registry, repo_name: str, busybox_image) -> None:
    push_image(busybox_image.layout, f"{registry.host}/{repo_name}:v1", source_tag="v1")
    events: list[BlobProgress] = []
    again = push_image(busybox_image.layout, f"{registry.host}/{repo_name}:v2", source_tag="v1",
                       progress=events.append)
    assert again.uploaded == [] and again.bytes_uploaded == 0
    assert again.existing == image_blobs(busybox_image.layout, "v1")
    assert {e.action for e in events} == {"exists"}


def test_cross_repository_mount(registry, repo_name: str, busybox_image) -> None:
    push_image(busybox_image.layout, f"{registry.host}/{repo_name}-a:v1", source_tag="v1")
    report = push_image(busybox_image.layout, f"{registry.host}/{repo_name}-b:v1", source_tag="v1",
                        mount_from=f"{repo_name}-a")
    assert report.mounted == image_blobs(busybox_image.layout, "v1") and report.uploaded == []
    oci = {"Accept": "application/vnd.oci.image.manifest.v1+json"}  # without it, distribution 2.8 answers 404
    assert httpx.head(f"{registry.url}/v2/{repo_name}-b/manifests/v1", headers=oci).status_code == 200


def big_image(tmp_path: Path, size: int) -> Path:
    """An image with one incompressible layer of about `size` bytes, to force chunked uploads."""
    payload = tmp_path / "payload"
    payload.mkdir()
    (payload / "weights.bin").write_bytes(os.urandom(size))
    build_image(None, [LayerSpec.directory(payload, "/models")], ImageConfig(), tmp_path / "big", "v1")
    return tmp_path / "big"


def test_chunked_upload_reports_progress_and_pulls_back(tmp_path: Path, registry, repo_name: str) -> None:
    layout = big_image(tmp_path, 3 * 2**20)
    layer = image_blobs(layout, "v1")[0]
    size = Layout(layout).blob_path(layer).stat().st_size
    events: list[BlobProgress] = []
    push_image(layout, f"{registry.host}/{repo_name}:v1", progress=events.append, monolithic_max=256 * 1024,
               chunk_size=512 * 1024)
    steps = [e.done for e in events if e.digest == layer]
    assert steps == sorted(steps) and steps[-1] == size and len(steps) == -(-size // (512 * 1024))
    pulled = pull_image(f"{registry.host}/{repo_name}:v1", tmp_path / "pulled")
    assert pulled.manifest_digest == Layout(layout).resolve("v1")["digest"]
    assert (tmp_path / "pulled" / "blobs" / "sha256" / layer.split(":")[1]).read_bytes() == \
        Layout(layout).blob_path(layer).read_bytes()
    again = pull_image(f"{registry.host}/{repo_name}:v1", tmp_path / "pulled", tag="copy")
    assert again.downloaded == [] and Layout(tmp_path / "pulled").tags() == ["v1", "copy"]


class FlakyTransport(httpx.BaseTransport):
    """The real registry behind faults: 5xx answers and connections that drop before or after the registry
    acted. `faults` maps (method, kind, nth request of that kind) to the fault."""

    def __init__(self, faults: dict[tuple[str, str, int], str]) -> None:
        self.real = httpx.HTTPTransport()
        self.faults = faults
        self.seen: Counter[tuple[str, str]] = Counter()
        self.hit: list[tuple[str, str, int, str]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        kind = "manifest" if "/manifests/" in path else "upload" if "/blobs/uploads/" in path else "blob"
        self.seen[(request.method, kind)] += 1
        fault = self.faults.get((request.method, kind, self.seen[(request.method, kind)]))
        if fault:
            self.hit.append((request.method, kind, self.seen[(request.method, kind)], fault))
        if fault and fault.startswith("status-"):
            return httpx.Response(int(fault.split("-")[1]), request=request)
        if fault == "drop-before":
            raise httpx.ConnectError("connection refused (injected)", request=request)
        response = self.real.handle_request(request)
        if fault == "drop-after":
            response.read()
            response.close()
            raise httpx.ReadError("connection reset after the registry acted (injected)", request=request)
        return response

    def close(self) -> None:
        self.real.close()


def test_push_survives_5xx_and_dropped_connections(tmp_path: Path, registry, repo_name: str) -> None:
    layout = big_image(tmp_path, 2 * 2**20)
    transport = FlakyTransport({
        ("HEAD", "blob", 1): "status-503",
        ("POST", "upload", 1): "drop-before",
        ("PATCH", "upload", 2): "drop-after",  # the registry has the chunk; we must resume after it
        ("PATCH", "upload", 4): "status-500",  # the registry never saw it; we must send it again
        ("PUT", "manifest", 1): "status-502",
    })
    report = push_image(layout, f"{registry.host}/{repo_name}:v1", monolithic_max=128 * 1024, chunk_size=256 * 1024,
                        backoff=0.01, transport=transport)
    assert len(transport.hit) == 5, transport.hit
    assert transport.seen[("GET", "upload")] == 2  # asked twice how far the upload got
    assert transport.seen[("POST", "upload")] == 4  # layer: 1 refused + 1 + 1 after the lost session; config: 1
    assert report.manifest_digest == Layout(layout).resolve("v1")["digest"]
    pulled = pull_image(f"{registry.host}/{repo_name}:v1", tmp_path / "pulled")  # verifies every blob's digest
    assert sorted(pulled.downloaded) == sorted(image_blobs(layout, "v1"))


def test_an_unreachable_registry_is_a_clear_error(tmp_path: Path, busybox_image) -> None:
    with pytest.raises(RegistryError, match=r"HEAD .*127\.0\.0\.1:9.*ConnectError"):
        push_image(busybox_image.layout, "127.0.0.1:9/x/y:v1", source_tag="v1", retries=1, backoff=0.01)


def secrets_of(login) -> list[str]:
    pair = f"{login.username}:{login.password}".encode()
    return [login.password, base64.b64encode(pair).decode(), base64.urlsafe_b64encode(pair).decode()]


@pytest.fixture
def no_ambient_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Neither the machine's docker config nor its environment may log the tests in."""
    monkeypatch.delenv("BENTO_LIKE_REGISTRY_USER", raising=False)
    monkeypatch.delenv("BENTO_LIKE_REGISTRY_PASSWORD", raising=False)
    (tmp_path / "empty-docker-config").mkdir()
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "empty-docker-config"))


def test_basic_auth_with_htpasswd(tmp_path: Path, auth_registry, repo_name: str, busybox_image, caplog, capsys,
                                  monkeypatch, no_ambient_credentials) -> None:
    server, login = auth_registry
    caplog.set_level(logging.DEBUG)  # every logger, httpx's and httpcore's included
    ref = f"{server.host}/{repo_name}:v1"
    creds = Credentials(login.username, login.password)
    report = push_image(busybox_image.layout, ref, source_tag="v1", credentials=creds)
    assert report.manifest_digest == busybox_image.manifest_digest
    pulled = pull_image(ref, tmp_path / "pulled", credentials=creds)
    assert pulled.manifest_digest == busybox_image.manifest_digest
    remote = json.loads(skopeo("inspect", "--tls-verify=false", "--creds", f"{login.username}:{login.password}",
                               f"docker://{ref}"))
    assert remote["Digest"] == busybox_image.manifest_digest

    wrong = "wrong-" + uuid.uuid4().hex
    with pytest.raises(AuthError) as refused:
        push_image(busybox_image.layout, ref, source_tag="v1", credentials=Credentials(login.username, wrong))
    assert f"rejected the credentials of user {login.username!r}" in str(refused.value)
    assert wrong not in str(refused.value) and wrong not in repr(refused.value)
    with pytest.raises(AuthError, match="requires a login"):
        push_image(busybox_image.layout, ref, source_tag="v1", credentials=None)

    monkeypatch.setenv("BENTO_LIKE_REGISTRY_USER", login.username)
    monkeypatch.setenv("BENTO_LIKE_REGISTRY_PASSWORD", login.password)
    assert push_image(busybox_image.layout, ref, source_tag="v1").uploaded == []

    monkeypatch.delenv("BENTO_LIKE_REGISTRY_USER")
    monkeypatch.delenv("BENTO_LIKE_REGISTRY_PASSWORD")
    docker_config = tmp_path / "docker"
    docker_config.mkdir()
    auth = base64.b64encode(f"{login.username}:{login.password}".encode()).decode()
    (docker_config / "config.json").write_text(json.dumps({"auths": {f"http://{server.host}": {"auth": auth}}}))
    monkeypatch.setenv("DOCKER_CONFIG", str(docker_config))
    assert push_image(busybox_image.layout, f"{server.host}/{repo_name}:v2", source_tag="v1").existing

    output = caplog.text + "".join(capsys.readouterr())
    assert "bento_like.registry" in caplog.text  # the logs were captured: the check below means something
    for secret in [*secrets_of(login), wrong]:
        assert secret not in output
    assert login.password not in repr(creds)


def test_credentials_from_env_and_docker_config(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"auths": {
        "https://index.docker.io/v1/": {"auth": base64.b64encode(b"hubuser:hub:pass").decode()},
        "registry.example.com": {"username": "plain", "password": "pw"},
        "broken.example.com": {},
    }}))
    assert load_credentials("docker.io", env={}, config_path=config) == Credentials("hubuser", "hub:pass")
    assert load_credentials("registry.example.com", env={}, config_path=config) == Credentials("plain", "pw")
    assert load_credentials("broken.example.com", env={}, config_path=config) is None
    assert load_credentials("other.example.com", env={}, config_path=config) is None
    assert load_credentials("x.io", env={}, config_path=tmp_path / "missing.json") is None
    env = {"BENTO_LIKE_REGISTRY_USER": "ci", "BENTO_LIKE_REGISTRY_PASSWORD": "tok"}
    assert load_credentials("registry.example.com", env=env, config_path=config) == Credentials("ci", "tok")
    assert "tok" not in repr(Credentials("ci", "tok"))


def test_references_parse_like_docker() -> None:
    assert Reference.parse("python:3.11") == Reference("docker.io", "library/python", "3.11")
    assert Reference.parse("ghcr.io/org/app") == Reference("ghcr.io", "org/app", "latest")
    assert Reference.parse("docker://127.0.0.1:5000/a/b:v1") == Reference("127.0.0.1:5000", "a/b", "v1")
    digest = "sha256:" + "ab" * 32
    ref = Reference.parse(f"localhost/app@{digest}")
    assert (ref.registry, ref.tag, ref.reference, str(ref)) == ("localhost", None, digest, f"localhost/app@{digest}")
    with pytest.raises(RegistryError, match="invalid repository name"):
        Reference.parse("127.0.0.1:5000/App")


# --- bearer tokens, as Docker Hub, GHCR and Harbor hand them out ----------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenService:
    """A token service of the distribution spec: basic credentials in, a JWT (RS256, signed with a key whose
    self-signed certificate the registry trusts) out, granting what the scopes ask for."""

    issuer, service = "bento-like-test-issuer", "bento-like-test"

    def __init__(self, root: Path, username: str, password: str) -> None:
        require("openssl")
        self.key, self.cert = root / "token.key", root / "token.pem"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(self.key),
                        "-out", str(self.cert), "-days", "2", "-subj", "/CN=bento-like-test-token"],
                       check=True, capture_output=True)
        der = subprocess.run(["openssl", "x509", "-in", str(self.cert), "-outform", "DER"], check=True,
                             capture_output=True).stdout
        self.x5c = base64.b64encode(der).decode()
        self.expected = "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()
        self.scopes: list[list[str]] = []
        service = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.headers.get("Authorization") != service.expected:
                    self.send_response(401)
                    self.end_headers()
                    return
                query = parse_qs(urlsplit(self.path).query)
                scopes = query.get("scope", [])
                service.scopes.append(scopes)
                body = json.dumps({"token": service.sign(scopes)}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.realm = f"http://127.0.0.1:{self.server.server_address[1]}/token"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def sign(self, scopes: list[str]) -> str:
        access = []
        for scope in scopes:
            kind, rest = scope.split(":", 1)
            name, actions = rest.rsplit(":", 1)
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        claims = {"iss": self.issuer, "sub": "builder", "aud": self.service, "exp": now + 300, "nbf": now - 10,
                  "iat": now - 10, "jti": uuid.uuid4().hex, "access": access}
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self.x5c]}
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        signature = subprocess.run(["openssl", "dgst", "-sha256", "-sign", str(self.key)],
                                   input=signing_input.encode(), check=True, capture_output=True).stdout
        return f"{signing_input}.{_b64url(signature)}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def token_registry(tmp_path: Path, start_registry):
    """A registry that trusts only tokens from our TokenService."""
    login = Credentials("builder", "tok-" + uuid.uuid4().hex[:12])
    tokens = TokenService(tmp_path, login.username, login.password)
    server = start_registry(token={"realm": tokens.realm, "service": tokens.service, "issuer": tokens.issuer,
                                   "rootcertbundle": str(tokens.cert)})
    yield server, tokens, login
    tokens.stop()


def test_bearer_token_auth(tmp_path: Path, token_registry, repo_name: str, busybox_image, caplog,
                           no_ambient_credentials) -> None:
    server, tokens, login = token_registry
    caplog.set_level(logging.DEBUG)
    creds = login
    challenge = httpx.get(f"{server.url}/v2/").headers["WWW-Authenticate"]
    assert challenge.startswith("Bearer realm=")
    report = push_image(busybox_image.layout, f"{server.host}/{repo_name}:v1", source_tag="v1", credentials=creds)
    assert report.manifest_digest == busybox_image.manifest_digest
    assert [f"repository:{repo_name}:pull,push"] in tokens.scopes
    mounted = push_image(busybox_image.layout, f"{server.host}/{repo_name}-b:v1", source_tag="v1",
                         credentials=creds, mount_from=repo_name)
    assert mounted.mounted == image_blobs(busybox_image.layout, "v1")
    assert [f"repository:{repo_name}-b:pull,push", f"repository:{repo_name}:pull"] in tokens.scopes
    pulled = pull_image(f"{server.host}/{repo_name}-b:v1", tmp_path / "pulled", credentials=creds)
    assert pulled.manifest_digest == busybox_image.manifest_digest
    with pytest.raises(AuthError, match=f"token service of .* refused user '{login.username}'"):
        push_image(busybox_image.layout, f"{server.host}/{repo_name}:v1", source_tag="v1",
                   credentials=Credentials(login.username, "nope"))
    with pytest.raises(AuthError, match="token service of .* refused anonymous access"):
        pull_image(f"{server.host}/{repo_name}:v1", tmp_path / "anon", credentials=None)
    for secret in secrets_of(login):
        assert secret not in caplog.text


# --- where credentials may travel ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("base_url", "realm", "insecure", "allowed"), [
    ("https://registry.example", "https://auth.example/token", False, True),  # Docker Hub's shape
    ("https://registry.example", "http://auth.example/token", False, False),  # foreign host in clear
    ("https://registry.example", "http://registry.example/token", False, False),  # downgrade on the same host
    ("https://registry.example", "http://registry.example/token", True, False),  # --insecure doesn't make https http
    ("http://registry.lan:5000", "http://registry.lan:5001/token", True, True),  # the user's own plain registry
    ("http://registry.lan:5000", "http://auth.example/token", True, False),  # ... but not another host in clear
    ("http://127.0.0.1:5000", "http://127.0.0.1:5001/token", False, True),  # loopback
    ("http://localhost:5000", "http://localhost/token", False, True),
    ("https://registry.example", "file:///etc/passwd", False, False),
    ("https://registry.example", "/token", False, False),
])
def test_which_token_realms_may_be_asked(base_url: str, realm: str, insecure: bool, allowed: bool) -> None:
    from bento_like.builders.registry import realm_refusal

    refusal = realm_refusal(base_url, realm, insecure=insecure)
    assert (refusal is None) is allowed, refusal


class _Recorder(ThreadingHTTPServer):
    """A plain-HTTP server that records every request line and Authorization header it receives."""

    def __init__(self, host: str) -> None:
        self.seen: list[tuple[str, str | None]] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                recorder.seen.append((self.path, self.headers.get("Authorization")))
                body = json.dumps({"token": "stolen"}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        super().__init__((host, 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


def test_an_https_registry_with_a_plain_http_realm_elsewhere_gets_no_password(tmp_path: Path) -> None:
    """The probe of issue 16: a real HTTPS registry (docker-registry with TLS on 127.0.0.2, which the client does
    not treat as loopback) whose token realm is plain HTTP on another host (127.0.0.3). Nothing may reach it."""
    require("docker-registry", "openssl")
    try:
        recorder = _Recorder("127.0.0.3")
    except OSError as exc:
        pytest.skip(f"127.0.0.3 is not usable here: {exc}")
    cert, key = tmp_path / "tls.pem", tmp_path / "tls.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "2", "-subj", "/CN=127.0.0.2", "-addext", "subjectAltName=IP:127.0.0.2"],
                   check=True, capture_output=True)
    tokens = TokenService(tmp_path, "builder", "unused")  # only its signing certificate: the registry needs one
    tokens.stop()
    with socket.socket() as probe:
        probe.bind(("127.0.0.2", 0))
        port = probe.getsockname()[1]
    realm = f"http://127.0.0.3:{recorder.server_address[1]}/token"
    config = tmp_path / "config.yml"
    config.write_text("\n".join([
        "version: 0.1",
        f"storage: {{filesystem: {{rootdirectory: {tmp_path / 'data'}}}}}",
        f"http: {{addr: '127.0.0.2:{port}', secret: s-{uuid.uuid4().hex}, tls: {{certificate: {cert}, key: {key}}}}}",
        f"auth: {{token: {{realm: '{realm}', service: svc, issuer: iss, rootcertbundle: '{tokens.cert}'}}}}",
    ]) + "\n")
    proc = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    login = Credentials("builder", "pw-" + uuid.uuid4().hex[:12])
    trust = ssl.create_default_context(cafile=str(cert))
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                challenge = httpx.get(f"https://127.0.0.2:{port}/v2/", verify=trust, timeout=1)
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, "docker-registry with TLS did not start"
                time.sleep(0.1)
        assert challenge.status_code == 401 and realm in challenge.headers["WWW-Authenticate"]
        with pytest.raises(AuthError, match="plain HTTP") as refused:
            pull_image(f"127.0.0.2:{port}/some/repo:v1", tmp_path / "pulled", credentials=login,
                       transport=httpx.HTTPTransport(verify=trust))
        assert login.password not in str(refused.value)
        assert recorder.seen == []
    finally:
        proc.terminate()
        proc.wait(10)
        recorder.shutdown()
        recorder.server_close()


def test_a_blob_larger_than_its_descriptor_is_refused_while_it_downloads(tmp_path: Path) -> None:
    import hashlib

    declared = b"x" * 10
    digest = "sha256:" + hashlib.sha256(declared).hexdigest()
    endless = httpx.MockTransport(lambda request: httpx.Response(200, content=declared * 2**20))
    layout = Layout.init(tmp_path / "layout")
    with RegistryClient("127.0.0.1:1", transport=endless) as client, \
            pytest.raises(RegistryError, match=r"more than the 10 bytes its manifest declares"):
        client.fetch_blob("t/x", digest, len(declared), layout)
    assert not any((tmp_path / "layout" / "blobs" / "sha256").iterdir())  # nothing half-written left behind


def test_a_manifest_larger_than_the_limit_is_refused_while_it_downloads() -> None:
    from bento_like.builders.registry import MAX_MANIFEST_BYTES

    sent: list[int] = []

    def endless():  # type: ignore[no-untyped-def]  # a hostile registry that never stops sending its manifest
        while True:
            sent.append(2**16)
            yield b" " * 2**16

    hostile = httpx.MockTransport(lambda request: httpx.Response(
        200, headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"}, content=endless()))
    with RegistryClient("127.0.0.1:1", transport=hostile) as client, \
            pytest.raises(RegistryError, match=rf"larger than {MAX_MANIFEST_BYTES} bytes; refused"):
        client.image_manifest("t/x", "v1")
    assert sum(sent) <= MAX_MANIFEST_BYTES + 2**16  # it stopped reading at the limit
