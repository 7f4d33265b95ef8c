"""Helpers shared by the model store tests (fixtures live in conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
