"""Autotuning of the Triton kernels, with results kept on disk.

`autotune` is `triton.autotune` with `cache_results` on (where the installed Triton has it): the timings of
each (kernel, key, configs) land in Triton's cache directory, so a restarted server, a spawned rank or the
next benchmark on the same machine and GPU reuses them instead of compiling and timing every config again
(15-47 s per MoE shape on the H200). Triton keys the entry by the kernel source, the configs, the tuning key,
the GPU target and its compiler, so a change to any of them tunes afresh. The interpreter never caches.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import triton

_DISK = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}


def autotune(configs: list[triton.Config], key: list[str], **kwargs: Any) -> Callable:
    return triton.autotune(configs=configs, key=key, **_DISK, **kwargs)
