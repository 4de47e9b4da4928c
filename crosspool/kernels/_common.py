"""Small launch helpers shared by the Triton kernel wrappers (no triton import here)."""

from __future__ import annotations

import functools
import os

import torch


def env_int(name: str, default: int, minimum: int = 0) -> int:
    """An integer setting from environment variable `name` (default when unset or empty); a value that is not an
    integer of at least `minimum` is a clear error naming the variable."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        number = int(value)
    except ValueError:
        number = None
    if number is None or number < minimum:
        raise ValueError(f"{name}={value!r}: expected an integer >= {minimum}")
    return number


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def block_dim(n: int) -> int:
    """Power-of-two tile size covering n, at least 16 (tl.dot needs every dimension >= 16)."""
    return max(16, next_pow2(n))


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs would run as TF32 on tensor cores by default; ask for exact fp32 so fp32 results are
    comparable with the torch reference. 16-bit inputs ignore the setting."""
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 elsewhere (the interpreter runs programs serially)."""
    if device.type != "cuda":
        return 1
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def tma_ok(w: torch.Tensor) -> bool:
    """Whether TMA can read w: a GPU that has it (sm_90 and later; off the GPU the interpreter emulates it), a
    contiguous last dim, every other stride a multiple of 16 bytes, a 16-byte aligned address."""
    if w.device.type == "cuda" and _capability(w.device.index if w.device.index is not None
                                               else torch.cuda.current_device())[0] < 9:
        return False
    size = w.element_size()
    return (w.stride(-1) == 1 and all(w.stride(d) * size % 16 == 0 for d in range(w.dim() - 1))
            and w.data_ptr() % 16 == 0)
