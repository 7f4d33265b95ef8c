"""A client for the OCI distribution API: push an image layout to a registry, pull one from it.

Push does as little as it can: each blob is first asked for (`HEAD`) and skipped when the registry has it, or
mounted from another repository of the same registry when `mount_from` names one, so pushing a rebuilt image sends
only its changed layers. Small blobs go up in one `PUT`, large ones in `PATCH` chunks that resume from what the
registry says it holds after a failed chunk. Idempotent requests are retried with exponential backoff on 5xx, 429
and connection errors.

Auth is anonymous, basic, or bearer tokens (a 401 with `WWW-Authenticate: Bearer realm=...` sends us to the token
service with the basic credentials). Nothing goes over plain HTTP unless the registry itself is reached that way
(loopback, or `insecure`), and a token service on another host than the registry must be HTTPS: a registry that
answers with a plain-HTTP realm elsewhere is refused before anything is sent there. Credentials come from BENTO_LIKE_REGISTRY_USER/BENTO_LIKE_REGISTRY_PASSWORD
or from `~/.docker/config.json`; they never appear in a log line, an exception or a repr.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping
from urllib.parse import urljoin, urlsplit

import httpx

from ._oci_layout import INDEX_TYPES, MANIFEST_TYPES, MEDIA_INDEX, MEDIA_MANIFEST, Layout, select_platform

log = logging.getLogger("bento_like.registry")

DOCKER_HUB = "docker.io"
_DOCKER_HUB_API = "registry-1.docker.io"
_DOCKER_HUB_ALIASES = {"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}
_ACCEPT = ", ".join([MEDIA_MANIFEST, MEDIA_INDEX, *MANIFEST_TYPES[1:], *INDEX_TYPES[1:]])
_REPOSITORY = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$")
_LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}


MAX_MANIFEST_BYTES = 4 * 1024 * 1024  # the limit containerd and the distribution registry put on a manifest


class RegistryError(Exception):
    """The registry refused or failed a request; the message names the request and the registry's own error."""


class AuthError(RegistryError):
    """Missing or rejected credentials. The message says which user and registry, never the secret."""


@dataclass(frozen=True)
class Reference:
    """`registry/repository[:tag][@digest]`, with Docker Hub's defaults (`python:3.11` -> docker.io/library/...)."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, text: str) -> Reference:
        name, _, digest = text.removeprefix("docker://").partition("@")
        tag = None
        if name.rfind(":") > name.rfind("/"):
            name, _, tag = name.rpartition(":")
        first, _, rest = name.partition("/")
        if rest and ("." in first or ":" in first or first == "localhost"):
            registry, repository = first, rest
        else:
            registry, repository = DOCKER_HUB, name if "/" in name else f"library/{name}"
        if not _REPOSITORY.match(repository):
            raise RegistryError(f"{text!r}: invalid repository name {repository!r} (lowercase, digits, . _ - /)")
        return cls(registry, repository, tag or (None if digest else "latest"), digest or None)

    @property
    def reference(self) -> str:
        """What goes after `/manifests/`: the digest when there is one, else the tag."""
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        return f"{self.registry}/{self.repository}" + (f":{self.tag}" if self.tag else "") + (
            f"@{self.digest}" if self.digest else "")


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str = field(repr=False)


def _registry_key(name: str) -> str:
    """`https://index.docker.io/v1/` and `docker.io` are one registry to docker's config file, and so to us."""
    host = urlsplit(name).netloc if "://" in name else name.split("/")[0]
    return DOCKER_HUB if host in _DOCKER_HUB_ALIASES else host


def load_credentials(registry: str, *, env: Mapping[str, str] | None = None,
                     config_path: Path | None = None) -> Credentials | None:
    """Credentials for registry: BENTO_LIKE_REGISTRY_USER/_PASSWORD first, else docker's config.json
    ($DOCKER_CONFIG/config.json or ~/.docker/config.json; `auths` entries with `auth` or `username`/`password`).
    Credential helpers (`credsStore`, `credHelpers`) are not consulted."""
    env = os.environ if env is None else env
    user, password = env.get("BENTO_LIKE_REGISTRY_USER"), env.get("BENTO_LIKE_REGISTRY_PASSWORD")
    if user and password is not None:
        return Credentials(user, password)
    if config_path is None:
        docker_dir = env.get("DOCKER_CONFIG")
        config_path = Path(docker_dir) / "config.json" if docker_dir else Path("~/.docker/config.json").expanduser()
    try:
        auths = json.loads(Path(config_path).read_text()).get("auths", {})
    except (OSError, ValueError):
        return None
    wanted = _registry_key(registry)
    for name, entry in auths.items():
        if _registry_key(name) != wanted or not isinstance(entry, dict):
            continue
        if entry.get("auth"):
            try:
                user, sep, password = base64.b64decode(entry["auth"]).decode().partition(":")
            except ValueError:
                raise AuthError(f"{config_path}: the `auth` entry for {name} is not base64 of user:password") from None
            if sep:
                return Credentials(user, password)
        if entry.get("username") and entry.get("password") is not None:
            return Credentials(entry["username"], entry["password"])
    return None


@dataclass(frozen=True)
class BlobProgress:
    """One step of one blob: `upload`/`download` report bytes as they go; `exists` and `mounted` come once."""

    digest: str
    action: Literal["upload", "download", "exists", "mounted"]
    done: int
    total: int


ProgressCallback = Callable[[BlobProgress], None]


@dataclass
class PushReport:
    reference: str
    manifest_digest: str
    uploaded: list[str] = field(default_factory=list)
    mounted: list[str] = field(default_factory=list)
    existing: list[str] = field(default_factory=list)
    bytes_uploaded: int = 0
    seconds: float = 0.0


@dataclass
class PullReport:
    reference: str
    manifest_digest: str
    downloaded: list[str] = field(default_factory=list)
    existing: list[str] = field(default_factory=list)
    bytes_downloaded: int = 0
    seconds: float = 0.0


class _Transient(RegistryError):
    """A 5xx, 429 or connection error: worth another try."""


def _error_text(response: httpx.Response) -> str:
    try:
        errors = response.json().get("errors") or []
        detail = "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors)
    except (ValueError, AttributeError):
        detail = response.text[:200]
    return f"{response.status_code} {response.reason_phrase}" + (f" ({detail})" if detail else "")


def _parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.strip().partition(" ")
    return scheme.lower(), {k.lower(): v for k, v in re.findall(r'(\w+)="([^"]*)"', rest)}


def _host(netloc: str) -> str:
    """The host of `host[:port]` (IPv6 in brackets kept), lowercased."""
    if netloc.startswith("["):
        return netloc.split("]")[0].lower() + "]"
    return netloc.rsplit(":", 1)[0].lower()


def realm_refusal(base_url: str, realm: str, *, insecure: bool) -> str | None:
    """Why the token service at `realm` must not be asked (with or without credentials), or None when it may.

    HTTPS is always fine. Plain HTTP is fine on loopback, and, with `insecure`, on the registry's own host: the
    user said that host is reached in clear. A plain-HTTP realm anywhere else would receive the password (or a
    token) in clear, and a downgrade from an HTTPS registry is never what the user asked for.
    """
    parts = urlsplit(realm)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return f"the token realm {_safe(realm)!r} is not an http(s) URL"
    if parts.scheme == "https":
        return None
    host = _host(parts.netloc)
    if host in _LOCAL_HOSTS:
        return None
    registry = urlsplit(base_url)
    if insecure and registry.scheme == "http" and host == _host(registry.netloc):
        return None
    if registry.scheme == "https":
        return (f"the registry is HTTPS but its token realm {_safe(realm)} is plain HTTP: "
                f"credentials would travel in clear")
    return (f"its token realm {_safe(realm)} is plain HTTP on another host than the registry "
            f"(only HTTPS is allowed there, even with --insecure)")


def _safe(url: str) -> str:
    """A URL for messages: without its query string, where upload state lives."""
    return url.split("?", 1)[0]


class RegistryClient:
    """One registry, one connection pool, and the tokens it handed out. Use as a context manager.

    Plain HTTP is used for 127.0.0.1/localhost or when `insecure` is set; HTTPS otherwise. Blobs up to
    `monolithic_max` bytes go in one PUT; larger ones in `chunk_size` PATCHes, each reported to `progress`.
    """

    def __init__(self, registry: str, *, credentials: Credentials | None = None, insecure: bool = False,
                 chunk_size: int = 16 * 2**20, monolithic_max: int = 16 * 2**20, retries: int = 4,
                 backoff: float = 0.5, timeout: float = 120.0, transport: httpx.BaseTransport | None = None) -> None:
        self.registry = registry
        scheme = "http" if insecure or _host(registry) in _LOCAL_HOSTS else "https"
        self.insecure = insecure
        api_host = _DOCKER_HUB_API if registry == DOCKER_HUB else registry
        self.base_url = f"{scheme}://{api_host}"
        self.credentials = credentials
        self.chunk_size, self.monolithic_max = chunk_size, monolithic_max
        self.retries, self.backoff = retries, backoff
        self._http = httpx.Client(timeout=timeout, transport=transport, follow_redirects=True,
                                  headers={"User-Agent": "bento_like-registry/1"})
        self._basic = False
        self._tokens: dict[tuple[str, ...], str] = {}

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # --- requests, retries and auth ------------------------------------------------------------------------------

    def _authorization(self, scopes: tuple[str, ...]) -> dict[str, str]:
        if scopes in self._tokens:
            return {"Authorization": f"Bearer {self._tokens[scopes]}"}
        if self._basic and self.credentials is not None:
            pair = f"{self.credentials.username}:{self.credentials.password}".encode()
            return {"Authorization": "Basic " + base64.b64encode(pair).decode()}
        return {}

    def _request(self, method: str, url: str, scopes: tuple[str, ...], *, headers: Mapping[str, str] | None = None,
                 content: bytes | None = None, retry: bool = True, stream: bool = False) -> httpx.Response:
        """One request with auth, retried on transient failures when `retry`; a last transient failure raises
        _Transient, so that callers with their own recovery (chunked uploads) can tell it from a refusal."""
        url = urljoin(self.base_url + "/", url)
        attempts = self.retries + 1 if retry else 1
        authenticated = False
        attempt = 0
        while True:
            attempt += 1
            request = self._http.build_request(method, url, headers={**(headers or {}), **self._authorization(scopes)},
                                               content=content)
            try:
                response = self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                if attempt < attempts:
                    self._sleep(attempt, f"{method} {_safe(url)}: {type(exc).__name__}")
                    continue
                raise _Transient(f"{method} {_safe(url)} on {self.registry}: {type(exc).__name__}: {exc}") from None
            if response.status_code == 401 and not authenticated:
                response.close()
                self._authenticate(response, scopes)
                authenticated = True
                attempt -= 1
                continue
            if response.status_code in (401, 403):
                response.close()
                raise self._refusal(response, f"{method} {_safe(url)}")
            if response.status_code >= 500 or response.status_code == 429:
                if stream:
                    response.read()
                text = f"{method} {_safe(url)} on {self.registry}: {_error_text(response)}"
                if attempt < attempts:
                    self._sleep(attempt, text)
                    continue
                raise _Transient(text)
            return response

    def _refusal(self, response: httpx.Response, what: str) -> AuthError:
        if self.credentials is None:
            return AuthError(f"{self.registry} requires a login for {what} ({_error_text(response)}): set "
                             f"BENTO_LIKE_REGISTRY_USER and BENTO_LIKE_REGISTRY_PASSWORD, or log in with docker")
        user = self.credentials.username
        if response.status_code == 401:
            return AuthError(f"{self.registry} rejected the credentials of user {user!r} ({what}: "
                             f"{_error_text(response)})")
        return AuthError(f"{self.registry} denied user {user!r} {what}: {_error_text(response)}")

    def _sleep(self, attempt: int, why: str) -> None:
        delay = self.backoff * 2 ** (attempt - 1)
        log.warning("%s; retrying in %.1f s", why, delay)
        time.sleep(delay)

    def _authenticate(self, response: httpx.Response, scopes: tuple[str, ...]) -> None:
        scheme, params = _parse_challenge(response.headers.get("WWW-Authenticate", ""))
        if scheme == "basic":
            if self.credentials is None or self._basic:
                raise self._refusal(response, f"{response.request.method} {_safe(str(response.request.url))}")
            self._basic = True
            return
        if scheme != "bearer" or "realm" not in params:
            raise AuthError(f"{self.registry} asked for an unsupported authentication: {scheme or 'none'}")
        refusal = realm_refusal(self.base_url, params["realm"], insecure=self.insecure)
        if refusal:
            raise AuthError(f"{self.registry}: refusing to ask the token service: {refusal}")
        # Our scopes cover what the request needs (push implies the pull a HEAD is challenged for).
        wanted = list(scopes) or ([params["scope"]] if params.get("scope") else [])
        query = [("service", params["service"])] if params.get("service") else []
        query += [("scope", s) for s in wanted]
        auth = (self.credentials.username, self.credentials.password) if self.credentials else None
        try:
            reply = self._http.get(params["realm"], params=query, auth=auth)
        except httpx.TransportError as exc:
            raise _Transient(f"token service {_safe(params['realm'])}: {type(exc).__name__}") from None
        if reply.status_code in (401, 403):
            who = f"user {self.credentials.username!r}" if self.credentials else "anonymous access"
            raise AuthError(f"token service of {self.registry} refused {who}: {_error_text(reply)}")
        if reply.status_code != 200:
            raise RegistryError(f"token service of {self.registry}: {_error_text(reply)}")
        body = reply.json()
        token = body.get("token") or body.get("access_token")
        if not token:
            raise AuthError(f"token service of {self.registry} answered without a token")
        self._tokens[scopes] = token

    # --- push ----------------------------------------------------------------------------------------------------

    def push(self, layout: Path | Layout, repository: str, tag: str, *, source_tag: str | None = None,
             mount_from: str | None = None, progress: ProgressCallback | None = None) -> PushReport:
        """Push the image tagged `source_tag` (default: `tag`) in `layout` as `repository:tag`."""
        started = time.perf_counter()
        layout = layout if isinstance(layout, Layout) else Layout(Path(layout))
        descriptor = layout.resolve(source_tag or tag)
        manifest_bytes = layout.read_blob(descriptor["digest"])
        manifest = json.loads(manifest_bytes)
        media_type = descriptor.get("mediaType") or manifest.get("mediaType") or MEDIA_MANIFEST
        if media_type not in MANIFEST_TYPES:
            raise RegistryError(f"{layout.root}:{source_tag or tag} is a {media_type}; only single-platform "
                                f"image manifests are pushed")
        report = PushReport(f"{self.registry}/{repository}:{tag}", descriptor["digest"])
        scopes = (f"repository:{repository}:pull,push",) + ((f"repository:{mount_from}:pull",) if mount_from else ())
        for blob in [*manifest["layers"], manifest["config"]]:
            self._push_blob(layout, repository, blob, scopes, mount_from, progress, report)
        response = self._request("PUT", f"/v2/{repository}/manifests/{tag}", scopes,
                                 headers={"Content-Type": media_type}, content=manifest_bytes)
        if response.status_code not in (200, 201):
            raise RegistryError(f"PUT manifest {repository}:{tag} on {self.registry}: {_error_text(response)}")
        echoed = response.headers.get("Docker-Content-Digest")
        if echoed and echoed != descriptor["digest"]:
            raise RegistryError(f"{self.registry} stored the manifest of {repository}:{tag} as {echoed}, "
                                f"not {descriptor['digest']}: it rewrote it")
        report.seconds = time.perf_counter() - started
        log.info("pushed %s (%s): %d uploaded, %d mounted, %d already there, %d bytes", report.reference,
                 report.manifest_digest, len(report.uploaded), len(report.mounted), len(report.existing),
                 report.bytes_uploaded)
        return report

    def _blob_exists(self, repository: str, digest: str, scopes: tuple[str, ...]) -> bool:
        response = self._request("HEAD", f"/v2/{repository}/blobs/{digest}", scopes)
        if response.status_code == 200:
            return True
        if response.status_code == 404:
            return False
        raise RegistryError(f"HEAD blob {digest} in {repository} on {self.registry}: {_error_text(response)}")

    def _push_blob(self, layout: Layout, repository: str, blob: Mapping[str, Any], scopes: tuple[str, ...],
                   mount_from: str | None, progress: ProgressCallback | None, report: PushReport) -> None:
        digest, size = blob["digest"], blob["size"]
        notify = progress or (lambda event: None)
        if self._blob_exists(repository, digest, scopes):
            report.existing.append(digest)
            notify(BlobProgress(digest, "exists", size, size))
            return
        start_url = f"/v2/{repository}/blobs/uploads/"
        if mount_from:
            response = self._request("POST", f"{start_url}?mount={digest}&from={mount_from}", scopes)
            if response.status_code == 201:
                report.mounted.append(digest)
                notify(BlobProgress(digest, "mounted", size, size))
                return
            location = self._upload_location(response, start_url)
        else:
            location = self._start_upload(start_url, scopes)
        path = layout.blob_path(digest)
        if size <= self.monolithic_max:
            data = path.read_bytes()
            response = self._request("PUT", _with_digest(location, digest), scopes, content=data,
                                     headers={"Content-Type": "application/octet-stream"})
        else:
            response = self._put_chunked(path, location, digest, size, scopes, notify,
                                         restart=lambda: self._start_upload(start_url, scopes))
        if response.status_code not in (201, 204) and not self._blob_exists(repository, digest, scopes):
            raise RegistryError(f"upload of {digest} to {repository} on {self.registry}: {_error_text(response)}")
        report.uploaded.append(digest)
        report.bytes_uploaded += size
        if size <= self.monolithic_max:
            notify(BlobProgress(digest, "upload", size, size))

    def _start_upload(self, start_url: str, scopes: tuple[str, ...]) -> str:
        return self._upload_location(self._request("POST", start_url, scopes), start_url)

    def _upload_location(self, response: httpx.Response, start_url: str) -> str:
        if response.status_code != 202 or "Location" not in response.headers:
            raise RegistryError(f"POST {start_url} on {self.registry}: {_error_text(response)}")
        return urljoin(str(response.url), response.headers["Location"])

    def _put_chunked(self, path: Path, location: str, digest: str, size: int, scopes: tuple[str, ...],
                     notify: ProgressCallback, restart: Callable[[], str]) -> httpx.Response:
        """PATCH the blob in chunks. After a failed chunk, ask the registry how far it got and go on from there;
        where the session cannot say (distribution signs the offset into the Location we may have lost), start
        a new session from byte 0."""
        offset, failures = 0, 0
        with open(path, "rb") as f:
            while offset < size:
                f.seek(offset)
                chunk = f.read(self.chunk_size)
                headers = {"Content-Type": "application/octet-stream",
                           "Content-Range": f"{offset}-{offset + len(chunk) - 1}"}
                try:
                    response = self._request("PATCH", location, scopes, headers=headers, content=chunk, retry=False)
                except _Transient as exc:
                    failures += 1
                    if failures > self.retries:
                        raise RegistryError(f"upload of {digest} failed {failures} times: {exc}") from None
                    self._sleep(failures, str(exc))
                    try:
                        location, offset = self._upload_status(location, scopes)
                    except _Transient:
                        raise
                    except RegistryError as lost:
                        log.warning("%s; starting the upload of %s again", lost, digest)
                        location, offset = restart(), 0
                    continue
                if response.status_code != 202:
                    raise RegistryError(f"PATCH {_safe(location)} on {self.registry}: {_error_text(response)}")
                location = urljoin(location, response.headers.get("Location", location))
                offset += len(chunk)
                notify(BlobProgress(digest, "upload", offset, size))
        return self._request("PUT", _with_digest(location, digest), scopes)

    def _upload_status(self, location: str, scopes: tuple[str, ...]) -> tuple[str, int]:
        """Where an interrupted upload stands: the registry's `Range: 0-<last byte>` ("0-0" before any byte)."""
        response = self._request("GET", location, scopes)
        if response.status_code != 204:
            raise RegistryError(f"cannot resume upload {_safe(location)} on {self.registry}: {_error_text(response)}")
        end = int(response.headers.get("Range", "0-0").split("-")[1])
        return urljoin(location, response.headers.get("Location", location)), end + 1 if end else 0

    # --- pull ----------------------------------------------------------------------------------------------------

    def pull(self, repository: str, reference: str, layout: Path | Layout, *, tag: str,
             platform: str = "linux/amd64", progress: ProgressCallback | None = None) -> PullReport:
        """Copy `repository@reference` (a tag or digest) into layout under `tag`; an index is resolved to the
        image for `platform`. Blobs the layout already holds are not fetched again."""
        started = time.perf_counter()
        layout = layout if isinstance(layout, Layout) else Layout.init(Path(layout))
        scopes = (f"repository:{repository}:pull",)
        media_type, data = self.image_manifest(repository, reference, platform)
        manifest = json.loads(data)
        digest, size = layout.write_blob(data)
        report = PullReport(f"{self.registry}/{repository}:{reference}", digest)
        for blob in [manifest["config"], *manifest["layers"]]:
            if layout.has_blob(blob["digest"]):
                report.existing.append(blob["digest"])
                continue
            self._download(repository, blob["digest"], blob["size"], layout, scopes, progress)
            report.downloaded.append(blob["digest"])
            report.bytes_downloaded += blob["size"]
        layout.set_tag(tag, {"mediaType": media_type, "digest": digest, "size": size})
        report.seconds = time.perf_counter() - started
        log.info("pulled %s (%s): %d blobs, %d bytes", report.reference, digest, len(report.downloaded),
                 report.bytes_downloaded)
        return report

    def image_manifest(self, repository: str, reference: str, platform: str = "linux/amd64") -> tuple[str, bytes]:
        """(media type, bytes) of the single-platform image manifest `reference` names; an index is resolved to
        its image for `platform`."""
        scopes = (f"repository:{repository}:pull",)
        media_type, data = self._get_manifest(repository, reference, scopes)
        if media_type in INDEX_TYPES:
            chosen = select_platform(json.loads(data), platform, where=f"{self.registry}/{repository}:{reference}")
            media_type, data = self._get_manifest(repository, chosen["digest"], scopes)
        if media_type not in MANIFEST_TYPES:
            raise RegistryError(f"{self.registry}/{repository}:{reference} is a {media_type}, not an image")
        return media_type, data

    def manifest_digest(self, repository: str, reference: str) -> str:
        """The digest of what `reference` names now (an index's own, for an index): one HEAD, the cheap way
        to notice that a tag moved. A registry that answers without Docker-Content-Digest costs a GET."""
        scopes = (f"repository:{repository}:pull",)
        response = self._request("HEAD", f"/v2/{repository}/manifests/{reference}", scopes,
                                 headers={"Accept": _ACCEPT})
        if response.status_code != 200:
            raise RegistryError(f"HEAD manifest {repository}:{reference} on {self.registry}: "
                                f"{response.status_code} {response.reason_phrase}")
        digest = response.headers.get("Docker-Content-Digest", "")
        if re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
            return digest
        return "sha256:" + hashlib.sha256(self._get_manifest(repository, reference, scopes)[1]).hexdigest()

    def fetch_blob(self, repository: str, digest: str, size: int, layout: Layout,
                   progress: ProgressCallback | None = None) -> Path:
        """Download one blob into layout (no more than `size` bytes, checked against its digest); its path."""
        if not layout.has_blob(digest):
            self._download(repository, digest, size, layout, (f"repository:{repository}:pull",), progress)
        return layout.blob_path(digest)

    def _get_manifest(self, repository: str, reference: str, scopes: tuple[str, ...]) -> tuple[str, bytes]:
        response = self._request("GET", f"/v2/{repository}/manifests/{reference}", scopes, headers={"Accept": _ACCEPT},
                                 stream=True)
        try:
            if response.status_code != 200:
                response.read()
                raise RegistryError(f"GET manifest {repository}:{reference} on {self.registry}: {_error_text(response)}")
            chunks, size = [], 0
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > MAX_MANIFEST_BYTES:  # hostile until checked: a registry could stream forever
                    raise RegistryError(f"{self.registry}/{repository}:{reference}: the manifest is larger than "
                                        f"{MAX_MANIFEST_BYTES} bytes; refused")
                chunks.append(chunk)
        finally:
            response.close()
        data = b"".join(chunks)
        if reference.startswith("sha256:") and "sha256:" + hashlib.sha256(data).hexdigest() != reference:
            raise RegistryError(f"{self.registry}/{repository}@{reference}: the manifest does not match its digest")
        media_type = response.headers.get("Content-Type", "").split(";")[0].strip()
        return media_type or json.loads(data).get("mediaType", ""), data

    def _download(self, repository: str, digest: str, size: int, layout: Layout, scopes: tuple[str, ...],
                  progress: ProgressCallback | None) -> None:
        for attempt in range(1, self.retries + 2):
            tmp = layout.temp_blob_path()
            try:
                response = self._request("GET", f"/v2/{repository}/blobs/{digest}", scopes, stream=True)
                try:
                    if response.status_code != 200:
                        response.read()
                        raise RegistryError(f"GET blob {digest} from {repository}: {_error_text(response)}")
                    hasher, done = hashlib.sha256(), 0
                    with open(tmp, "wb") as f:
                        for chunk in response.iter_bytes(2**20):
                            done += len(chunk)
                            if done > size:  # the manifest said how big it is: a registry sending more lies
                                raise RegistryError(f"GET blob {digest} from {repository}: more than the "
                                                    f"{size} bytes its manifest declares")
                            f.write(chunk)
                            hasher.update(chunk)
                            if progress:
                                progress(BlobProgress(digest, "download", done, size))
                finally:
                    response.close()
                if "sha256:" + hasher.hexdigest() != digest:
                    raise RegistryError(f"blob {digest} from {repository} does not match its digest")
                os.replace(tmp, layout.blob_path(digest))
                return
            except (httpx.TransportError, _Transient) as exc:
                if attempt > self.retries:
                    raise RegistryError(f"GET blob {digest} from {repository}: {exc}") from None
                self._sleep(attempt, f"GET blob {digest}: {type(exc).__name__}")
            finally:
                tmp.unlink(missing_ok=True)


def _with_digest(location: str, digest: str) -> str:
    return f"{location}{'&' if '?' in location else '?'}digest={digest}"


def push_image(layout: Path | Layout, reference: str | Reference, *, source_tag: str | None = None,
               mount_from: str | None = None, credentials: Credentials | None = None, insecure: bool = False,
               progress: ProgressCallback | None = None, **options: Any) -> PushReport:
    """Push an image from an OCI layout to `registry/repository:tag`; credentials are looked up when not given.
    `options` go to RegistryClient (chunk_size, monolithic_max, retries, backoff, timeout, transport)."""
    ref = reference if isinstance(reference, Reference) else Reference.parse(reference)
    if ref.tag is None:
        raise RegistryError(f"{ref}: pushing needs a tag")
    credentials = credentials or load_credentials(ref.registry)
    with RegistryClient(ref.registry, credentials=credentials, insecure=insecure, **options) as client:
        return client.push(layout, ref.repository, ref.tag, source_tag=source_tag, mount_from=mount_from,
                           progress=progress)


@dataclass(frozen=True)
class RemoteImage:
    """What a registry says of a reference: the manifest's digest, media type and annotations."""

    reference: Reference
    digest: str
    media_type: str
    annotations: dict[str, str]


def inspect_image(reference: str | Reference, *, credentials: Credentials | None = None, insecure: bool = False,
                  **options: Any) -> RemoteImage:
    """The manifest `reference` names in its registry (RegistryError when there is none)."""
    ref = reference if isinstance(reference, Reference) else Reference.parse(reference)
    credentials = credentials or load_credentials(ref.registry)
    with RegistryClient(ref.registry, credentials=credentials, insecure=insecure, **options) as client:
        media_type, data = client._get_manifest(ref.repository, ref.reference, (f"repository:{ref.repository}:pull",))
    try:
        annotations = json.loads(data).get("annotations") or {}
    except ValueError:
        raise RegistryError(f"{ref}: the registry answered a manifest that is not JSON") from None
    return RemoteImage(ref, "sha256:" + hashlib.sha256(data).hexdigest(), media_type,
                       {str(k): str(v) for k, v in annotations.items()} if isinstance(annotations, dict) else {})


def pull_image(reference: str | Reference, layout: Path | Layout, *, tag: str | None = None,
               platform: str = "linux/amd64", credentials: Credentials | None = None, insecure: bool = False,
               progress: ProgressCallback | None = None, **options: Any) -> PullReport:
    """Pull `reference` into an OCI layout (created if missing) under `tag` (default: the reference's tag)."""
    ref = reference if isinstance(reference, Reference) else Reference.parse(reference)
    credentials = credentials or load_credentials(ref.registry)
    with RegistryClient(ref.registry, credentials=credentials, insecure=insecure, **options) as client:
        return client.pull(ref.repository, ref.reference, layout, tag=tag or ref.tag or ref.reference,
                           platform=platform, progress=progress)
