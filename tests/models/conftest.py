"""Every model store test runs against its own BENTO_LIKE_HOME (the `home` fixture of tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _private_home(home: Path) -> Path:
    return home


@pytest.fixture
def store_root(home: Path) -> Path:
    return home / "models"
