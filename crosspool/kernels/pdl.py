"""Programmatic dependent launch (PDL, Hopper and later) for the decode path's Triton kernels.

A kernel launched with PDL may start while the kernel before it on the stream is still finishing: its launch,
scheduling and argument setup overlap the other's tail, which closes part of the gap between the ~200 small
kernels of a batch-1 decode step (each ~2-20 us). Captured into a CUDA graph, the launch becomes a programmatic
edge. The rule that keeps it correct: a kernel launched with PDL executes `gdc_wait` (wait for the previous
kernel to finish and its writes to be visible) before it touches global memory, and every kernel here does so
first thing (`enter`). Kernels launched without PDL (cuBLAS, torch's) wait as usual, so mixing is safe.

On by default on sm_90 and later: the H200 showed the gain (OLMoE decode, context 1k: batch 1 1.27 -> 1.19 ms,
batch 8 3.47 -> 3.38 ms; docs/benchmarks.md section 7, session 5) and a GPU test that the logits keep every bit.
`ENABLED = False`, or `CROSSPOOL_PDL=0` in the environment (which spawned ranks inherit), turns it off. The
interpreter (CPU) never uses it.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

ENABLED = os.environ.get("CROSSPOOL_PDL", "1") != "0"


@triton.jit
def enter(USE_PDL: tl.constexpr):
    """First statement of a kernel: with PDL, wait for the previous kernel, then let the next one launch (it
    waits in its own `enter` until this kernel has finished)."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@functools.cache
def _supported(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def options(device: torch.device) -> dict[str, bool]:
    """Launch keywords for a kernel with a `USE_PDL` parameter on `device`."""
    on = ENABLED and device.type == "cuda" and os.environ.get("TRITON_INTERPRET") != "1" and _supported(
        device.index if device.index is not None else torch.cuda.current_device())
    return _ON if on else _OFF


_ON = {"USE_PDL": True, "launch_pdl": True}
_OFF = {"USE_PDL": False}
