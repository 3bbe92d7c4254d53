from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny import make_checkpoint


@pytest.fixture(scope="session")
def dense_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random LFM2 checkpoint (float32, single file)."""
    return make_checkpoint(tmp_path_factory.mktemp("dense"))


@pytest.fixture(scope="session")
def moe_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random LFM2-MoE checkpoint (float32, single file)."""
    return make_checkpoint(tmp_path_factory.mktemp("moe"), moe=True)
