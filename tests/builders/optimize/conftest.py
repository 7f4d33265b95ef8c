"""Optimization builder tests: a private BENTO_LIKE_HOME per test (model store and pass cache), small models.

Triton kernels run in Triton's interpreter on machines without CUDA; the variable must be set before the
kernel module is first imported, which conftest files are (they load before the tests they cover).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.manual_seed(0)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: takes tens of seconds on a 2-core machine (torch.compile)")


@pytest.fixture(autouse=True)
def _private_home(home: Path) -> Path:
    return home


@pytest.fixture
def mlp_tag() -> str:
    from optimize_testlib import save_mlp

    return save_mlp()


@pytest.fixture
def encoder_tag() -> str:
    from optimize_testlib import save_encoder

    return save_encoder()
