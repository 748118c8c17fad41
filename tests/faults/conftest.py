"""Fixtures of the fault suite: one small model for every scenario."""

from __future__ import annotations

from pathlib import Path

import pytest
from harness import make_model


@pytest.fixture(scope="session")
def fault_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random resnet18 artifact on 64-pixel input, written once per session."""
    return make_model(tmp_path_factory.mktemp("fault_model"))
