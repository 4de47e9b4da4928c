"""Where a benchmark result comes from: date, commit, device and the CROSSPOOL_* switches set, stored with every
result file."""

from __future__ import annotations

import datetime
import os
import subprocess

import torch


def git_commit() -> str:
    """CROSSPOOL_COMMIT when set (the device machine gets a copy of the working tree whose .git may be stale:
    `scripts/gpu_x2.sh` sets it from `.run-commit`), else git's HEAD, else "unknown"."""
    if os.environ.get("CROSSPOOL_COMMIT"):
        return os.environ["CROSSPOOL_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def settings() -> dict[str, str]:
    """The CROSSPOOL_* switches set in the environment (kernel, graph and transport choices such as
    CROSSPOOL_FUSED_ROPE_ROWS), which the result was measured with; unset ones are at their defaults."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("CROSSPOOL_") and k != "CROSSPOOL_COMMIT"}


def stamp(device: torch.device | str | None = None) -> dict[str, object]:
    """{"date", "commit", "device", "settings"} for a result file; device: the CUDA device measured (default: the
    current one when there is a GPU, else "cpu")."""
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    return {"date": datetime.date.today().isoformat(), "commit": git_commit(), "device": name,
            "settings": settings()}
