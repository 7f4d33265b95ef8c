"""A fully pinned, hashed requirements lock for the image's platform and Python, resolved by pip.

pip resolves for another platform only with ``--target`` and ``--only-binary=:all:``; ``--dry-run --report``
then gives every package it would install with its version and the sha256 of the exact file. Locks are
cached by the digest of their inputs, so building the same bento twice gives the same lock (and the same
bento version) until ``refresh=True``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from ..bentos import BentoError
from .cache import touch

# A linux/amd64 glibc image: the wheel tags pip may pick for it.
PLATFORMS = {
    "linux/amd64": ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "linux_x86_64"),
    "linux/arm64": ("manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64", "linux_aarch64"),
}


class LockError(BentoError):
    """The requirements could not be resolved for the target; the message carries pip's reason."""


@dataclass(frozen=True)
class Lock:
    text: str
    packages: dict[str, str]  # name -> version


def runtime_requirements() -> list[str]:
    """What serving needs: bento_like's own dependencies, without extras (no exporters, no test tools)."""
    required = metadata.requires("bento_like") or []
    return sorted(r for r in required if "extra ==" not in r)


def resolve(
    requirements: list[str],
    *,
    python_version: str,
    platform: str = "linux/amd64",
    cache_dir: Path | None = None,
    refresh: bool = False,
) -> Lock:
    if platform not in PLATFORMS:
        raise LockError(f"platform {platform!r} is not supported; use one of {', '.join(PLATFORMS)}")
    wanted = sorted(set(requirements))
    key = hashlib.sha256(json.dumps([wanted, python_version, platform]).encode()).hexdigest()[:24]
    cached = cache_dir / f"{key}.json" if cache_dir else None
    if cached is not None and cached.is_file() and not refresh:
        data = json.loads(cached.read_text())
        touch(cached)  # used now: `pkg cache prune` removes the least recently used first
        return Lock(data["text"], data["packages"])
    with tempfile.TemporaryDirectory(prefix="bento-lock-") as tmp:
        req_file = Path(tmp) / "requirements.in"
        req_file.write_text("\n".join(wanted) + "\n")
        report = Path(tmp) / "report.json"
        cmd = [
            sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
            "--disable-pip-version-check", "--report", str(report), "--target", str(Path(tmp) / "target"),
            "--python-version", python_version, "--implementation", "cp", "--only-binary=:all:",
            *(arg for tag in PLATFORMS[platform] for arg in ("--platform", tag)),
            "-r", str(req_file),
        ]
        run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PIP_NO_INPUT": "1"})
        if run.returncode != 0:
            reason = "\n".join(line for line in run.stderr.splitlines() if not line.startswith("WARNING")).strip()
            raise LockError(
                f"could not resolve the Python requirements for {platform} / Python {python_version}:\n{reason}"
            )
        installs = json.loads(report.read_text())["install"]
    lines, packages = [], {}
    for item in sorted(installs, key=lambda i: i["metadata"]["name"].lower()):
        name, version = item["metadata"]["name"].lower(), item["metadata"]["version"]
        hashes = item.get("download_info", {}).get("archive_info", {}).get("hashes", {})
        digest = hashes.get("sha256")
        lines.append(f"{name}=={version}" + (f" --hash=sha256:{digest}" if digest else ""))
        packages[name] = version
    text = (
        f"# Resolved by pip for {platform}, CPython {python_version}; do not edit.\n" + "\n".join(lines) + "\n"
    )
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_text(json.dumps({"text": text, "packages": packages}))
    return Lock(text, packages)
