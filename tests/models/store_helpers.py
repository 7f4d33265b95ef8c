"""Helpers shared by the model store tests (fixtures live in conftest.py)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bento_like.models import FileEntry, ModelInfo
from bento_like.models._manifest import content_digest, encode, version_from_digest

HERE = Path(__file__).resolve().parent


def run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run code in a fresh interpreter that sees this test's BENTO_LIKE_HOME and the test models."""
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]), **env}
    return subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True, text=True, timeout=120)


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under root but the staging area, with its content: what 'untouched' compares."""
    if not root.exists():
        return {}
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file() and ".tmp" not in path.relative_to(root).parts
    }


def staging_leftovers(root: Path) -> list[str]:
    staging = root / ".tmp"
    return sorted(p.name for p in staging.iterdir()) if staging.exists() else []


def forged_manifest(name: str, version: str | None, files: dict[str, bytes], **fields: Any) -> tuple[str, bytes]:
    """(version, manifest.yaml) whose entries and digest agree with `files`: what a careful attacker writes.
    The version defaults to the digest's, as save derives it."""
    entries = [FileEntry(path=p, size=len(d), sha256=hashlib.sha256(d).hexdigest()) for p, d in sorted(files.items())]
    framework = fields.pop("framework", "files")
    details = fields.pop("details", {"root": "a", "kind": "directory"} if framework == "files" else {})
    metadata, labels = fields.pop("metadata", {}), fields.pop("labels", {})
    digest = content_digest(framework, entries, [], metadata, labels, details)
    version = version or version_from_digest(digest)
    info = ModelInfo(
        schema_version=1, name=name, version=version, framework=framework, digest=digest,
        created_at=datetime(2026, 1, 1, tzinfo=timezone.utc), files=entries, metadata=metadata, labels=labels,
        details=details, **fields,
    )
    return version, encode(info)
