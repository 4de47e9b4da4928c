"""Reading the megakernel's profile (issue 4): a chain built with `profile=True` counts each program's SM cycles
by activity and stamps the GPU's global timer at each phase's moments (`chain.py`); these turn the last launch's
counters into numbers."""

from __future__ import annotations

import torch

from crosspool.kernels.megakernel.chain import Chain


def cycles_by_activity(chain: Chain) -> dict[str, float]:
    """The last launch's SM cycles by what they were spent on, as fractions of each program's total, averaged
    over programs, and the mean total ("cycles")."""
    _need_profile(chain)
    c = chain.prof.double().cpu()
    frac = (c[:, [0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12]] / c[:, 8:9]).mean(0).tolist()
    names = ("input polls", "staging's rest", "ranking", "items' starts", "items' ends", "waiting for slots",
             "slot load + release", "arithmetic", "attention items", "of which waiting for KV slots",
             "the producer's ranking read", "the experts' weights (gates)")
    return dict(zip(names, frac, strict=True)) | {"cycles": c[:, 8].mean().item()}


def timeline(chain: Chain) -> torch.Tensor:
    """The last launch's [programs, phases, 8] stamps of the GPU's global timer, in us from the launch's first:
    each phase's start, its input staged, its first slot landed (attention: the program's last partial out), its
    items done; then its parts: an attention phase's q rotated, slots done, rows combined, new token folded in (its
    last item's); a routed phase's router logits polled, ranked, stored (where it ranked); any other phase's
    input polled (its last word seen, before the norm); NaN where a program had
    no such moment."""
    _need_profile(chain)
    t = chain.prof[:, 16:].cpu().reshape(chain.nprog, -1, 8)
    us = (t - t[:, 0, 0].min()).double() / 1e3
    return torch.where(t == 0, float("nan"), us)


def _need_profile(chain: Chain) -> None:
    if not chain.meta["PROFILE"]:
        raise ValueError("the chain was built without profile=True: it counts nothing")
