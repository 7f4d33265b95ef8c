"""Base images: the default one, making one without a registry (`pkg base create`), and checking a base before
a build spends minutes installing dependencies onto it.

A bento's image needs a base holding `python3` of the version the bento was locked for. By default that is
`docker.io/library/python:<version>-slim`, pulled into the build cache once. Where no registry can be reached,
`pkg base create` makes an equivalent from Debian packages with debootstrap: minbase plus python3, one layer.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .oci import (
    BaseImage,
    ImageConfig,
    ImageError,
    ImageResult,
    LayerSpec,
    build_image,
    check_base_platform,
    default_cache_dir,
    open_base,
    source_date_epoch,
)

DEFAULT_BASE = "docker.io/library/python:{version}-slim"
# Debian releases by the Python they ship as python3: what `pkg base create --python X.Y` can make.
DEBIAN_PYTHON = {"3.11": "bookworm", "3.13": "trixie"}
_PYTHON_FILE = re.compile(r"^(?:\./)?(?:usr/(?:local/)?)?bin/python(3\.\d+)$")


class BaseImageError(ImageError):
    """The base can't be made or used as asked; the message says what to do instead."""


def default_base(python_version: str) -> str:
    return DEFAULT_BASE.format(version=python_version)


def ways_out(python_version: str) -> str:
    """The two ways to a base without a registry, for error messages."""
    return (f"make one with `pkg base create --python {python_version}` and pass the oci:DIR:TAG it prints as "
            f"--base, or pass --base with an image you have (oci:DIR:TAG or oci-archive:FILE:TAG) holding "
            f"python{python_version}")


def check_base(base: BaseImage, python_version: str, platform: str, cache_dir: Path | None = None) -> str:
    """The base's Python (`3.11`), after checking that it is the bento's: a registry base is pulled into the
    cache first. Raises BaseImageError naming the base and the problem."""
    from .registry import RegistryError

    name = base.location if base.kind == "registry" else f"{'oci' if base.kind == 'layout' else 'oci-archive'}:{base.location}"
    with tempfile.TemporaryDirectory(prefix="bento_like-base-") as scratch:
        try:
            layout, tag, _ = open_base(base, Path(scratch), cache_dir or default_cache_dir() / "layers", platform)
        except (RegistryError, OSError, tarfile.TarError) as exc:  # unreachable, refused, unknown, unreadable
            reason = str(exc) or type(exc).__name__
            raise BaseImageError(f"base image {name} can't be pulled ({reason}); {ways_out(python_version)}") from None
        _, manifest = layout.image_manifest(tag, platform)
        check_base_platform(json.loads(layout.read_blob(manifest["config"]["digest"])), platform, name)
        found: set[str] = set()
        for layer in manifest["layers"]:
            found |= _pythons(layout.blob_path(layer["digest"]))
    if python_version in found:
        return python_version
    have = ", ".join(sorted(found)) if found else "none"
    raise BaseImageError(
        f"base image {name} holds no python{python_version} (its pythons: {have}), the Python the bento was "
        f"locked for; {ways_out(python_version)}")


def _pythons(blob: Path) -> set[str]:
    """The python3.X executables (under /usr/bin or /usr/local/bin) a layer adds."""
    with open(blob, "rb") as raw:
        magic = raw.read(2)
    opener = gzip.open if magic == b"\x1f\x8b" else open
    found = set()
    with opener(blob, "rb") as stream, tarfile.open(fileobj=stream, mode="r|") as tar:  # type: ignore[operator]
        for member in tar:
            match = _PYTHON_FILE.match(member.name)
            if match and (member.isfile() or member.issym() or member.islnk()):
                found.add(match.group(1))
    return found


@dataclass(frozen=True)
class CreatedBase:
    image: ImageResult
    python_version: str
    suite: str
    seconds: float

    @property
    def reference(self) -> str:
        return self.image.reference


def create_base(output: Path, *, python_version: str | None = None, tag: str | None = None,
                mirror: str | None = None, progress: Callable[[str], None] = lambda line: None) -> CreatedBase:
    """Debian minbase + python3 as a one-layer OCI image in the layout `output`, with debootstrap (root)."""
    python_version = python_version or (f"{sys.version_info.major}.{sys.version_info.minor}"
                                        if f"{sys.version_info.major}.{sys.version_info.minor}" in DEBIAN_PYTHON
                                        else "3.11")
    suite = DEBIAN_PYTHON.get(python_version)
    if suite is None:
        raise BaseImageError(
            f"no Debian release ships python{python_version} as python3 (debootstrap can make "
            f"{', '.join(f'{v} ({s})' for v, s in DEBIAN_PYTHON.items())}); pass --python one of those, or use a "
            f"python:{python_version}-slim image as --base")
    if shutil.which("debootstrap") is None:
        raise BaseImageError("pkg base create needs debootstrap (apt-get install debootstrap)")
    if os.geteuid() != 0:
        raise BaseImageError("pkg base create needs root: debootstrap makes device nodes and chroots")
    mirror = mirror or debian_mirror(suite)
    tag = tag or f"python{python_version}"
    started = time.perf_counter()
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bento_like-rootfs-", dir=output.parent) as scratch:
        rootfs = Path(scratch) / "rootfs"
        progress(f"debootstrap: Debian {suite} minbase + python3 from {mirror} (a minute or two)")
        # SOURCE_DATE_EPOCH: the tools that stamp dates into files (shadow's password ages) use the build's epoch
        env = {**os.environ, "SOURCE_DATE_EPOCH": str(source_date_epoch())}
        proc = subprocess.run(["debootstrap", "--variant=minbase", "--include=python3", suite, str(rootfs), mirror],
                              capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            tail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1:] or ["no output"]
            raise BaseImageError(f"debootstrap {suite} from {mirror} failed ({proc.returncode}): {tail[0]}")
        progress("image: one layer of the root filesystem")
        layer = LayerSpec.directory(
            rootfs, "/", preserve=True, comment=f"debian {suite} minbase + python3",
            # Device nodes are the runtime's to make; apt's caches are ~90 MB nobody needs at run time. The logs
            # and ldconfig's cache are the only files that differ between two runs: without them, the same
            # packages give the same layer digest.
            exclude=("dev/*", "var/cache/apt/archives/*.deb", "var/cache/apt/*.bin", "var/lib/apt/lists/*",
                     "var/log/*.log", "var/log/apt/*.log", "var/cache/ldconfig/aux-cache"))
        config = ImageConfig(cmd=["python3"], user=None, env={
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"})
        image = build_image(None, [layer], config, output, tag)
    return CreatedBase(image, python_version, suite, time.perf_counter() - started)


def debian_mirror(suite: str = "bookworm") -> str:
    """The mirror apt is configured with for `suite` (deb822 `URIs:` or one-line `deb URL SUITE`); else the one
    it uses for any release (not -security or -updates); else Debian's own."""
    found: dict[str, str] = {}  # suite -> mirror
    files = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*.sources")),
             *sorted(Path("/etc/apt/sources.list.d").glob("*.list"))]
    for path in files:
        if not path.is_file():
            continue
        text = path.read_text(errors="replace")
        for stanza in text.split("\n\n"):
            lines = [line for line in stanza.splitlines() if ":" in line and not line.startswith("#")]
            fields = dict(line.split(":", 1) for line in lines)
            if fields.get("URIs", "").strip() and "deb" in fields.get("Types", "deb").split():
                for name in fields.get("Suites", "").split():
                    found.setdefault(name, fields["URIs"].split()[0])
        for line in text.splitlines():
            parts = line.split()
            if parts[:1] == ["deb"]:
                rest = parts[1:] if not parts[1].startswith("[") else parts[2:]
                if len(rest) >= 2:
                    found.setdefault(rest[1], rest[0])
    if suite in found:
        return found[suite]
    return next((mirror for name, mirror in found.items() if "-" not in name), "http://deb.debian.org/debian")
