"""Entry point of ranks > 0: `python -m crosspool.pools.ranks --kv-ranks K --weights-ranks M ...`
(spawned by crosspool, or started by torchrun). A module of its own so that running it never executes
`transport` a second time as `__main__`."""

from __future__ import annotations

import argparse
import os

import torch

from crosspool.pools.transport import weights_rank_loop
from crosspool.pools.world import DTYPES, World, dump_stacks_later, init_world, leave_world


def rank_main(argv: list[str] | None = None) -> None:
    """Entry point of ranks > 0 (spawned by crosspool, or by torchrun with RANK/WORLD_SIZE set)."""
    p = argparse.ArgumentParser(description="a CrossPool rank (KV pool or weights pool)")
    p.add_argument("--rank", type=int, default=None)
    p.add_argument("--kv-ranks", type=int, required=True)
    p.add_argument("--weights-ranks", type=int, required=True)
    p.add_argument("--init", default="env://")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    a = p.parse_args(argv)
    dump_stacks_later()
    rank = a.rank if a.rank is not None else int(os.environ["RANK"])
    world = World(a.kv_ranks, a.weights_ranks, rank, torch.device(a.device))
    init_world(world, a.init)
    try:
        if world.is_kv:
            from crosspool.engine.distributed import kv_rank_loop

            kv_rank_loop(world, DTYPES[a.dtype])
        else:
            weights_rank_loop(world, DTYPES[a.dtype])
    finally:
        leave_world(world)


if __name__ == "__main__":
    rank_main()
