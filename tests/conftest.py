"""Shared fixtures: tiny checkpoints written once per test session by the real make-model code."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from crosspool.models.make_model import make_model


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    cache: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("models")

    def get(preset: str) -> Path:
        if preset not in cache:
            cache[preset] = make_model(preset, root / preset, seed=1, progress=False)
        return cache[preset]

    return get


@pytest.fixture
def graph_launch() -> Callable[[Callable[[], None]], None]:
    """A launcher for GPU tests of persistent kernels: its first call runs `fn` eagerly (compiling it) and captures
    it into a CUDA graph; each later call replays that graph. Every call ends synchronized."""
    import torch

    graph: list[torch.cuda.CUDAGraph] = []

    def launch(fn: Callable[[], None]) -> None:
        if graph:
            graph[0].replay()
        else:
            fn()
            graph.append(torch.cuda.CUDAGraph())
            with torch.cuda.graph(graph[0]):
                fn()
        torch.cuda.synchronize()

    return launch
