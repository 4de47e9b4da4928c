"""Where a benchmark result comes from: date, commit and device, stored with every result file."""

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


def stamp(device: torch.device | str | None = None) -> dict[str, str]:
    """{"date", "commit", "device"} for a result file; device: the CUDA device measured (default: the current
    one when there is a GPU, else "cpu")."""
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    return {"date": datetime.date.today().isoformat(), "commit": git_commit(), "device": name}
