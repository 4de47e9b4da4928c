"""Shared fixtures: tiny random-weight checkpoints, written once per test session."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from crosspool.models.make_model import make_model


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Factory: `tiny_models("tiny-olmoe")` -> directory of that preset (seed 1), built on first use."""
    cache: dict[str, Path] = {}

    def tiny_model_dir(preset: str) -> Path:
        if preset not in cache:
            out = tmp_path_factory.mktemp(preset)
            cache[preset] = make_model(preset, out, seed=1, progress=False)
        return cache[preset]

    return tiny_model_dir
