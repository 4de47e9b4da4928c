"""Cost of one engine step's control round between ranks (issue 8): rank 0 tells every rank "step" and gathers
what they return. `broadcast_control` + `gather_to_front` (a step without commands: two ints out, sizes back)
against the pickled-object collectives they replaced (`broadcast_object_list` + `gather_object`), in the same
run. Usage: python3 scripts/control_round_bench.py [--ranks 2] [--rounds 300] (CPU processes over gloo)."""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from crosspool.pools.world import World, broadcast_control, control_group, free_port, gather_to_front, init_world


def _rank(rank: int, size: int, rounds: int, port: int) -> None:
    world = World(1, size - 1, rank, torch.device("cpu"))
    init_world(world, f"tcp://127.0.0.1:{port}")

    def timed(round_fn) -> float:  # noqa: ANN001
        for _ in range(20):
            round_fn()
        dist.barrier(group=control_group())
        t = time.perf_counter()
        for _ in range(rounds):
            round_fn()
        return (time.perf_counter() - t) / rounds * 1e3

    def objects() -> None:
        box = [("step", {}) if rank == 0 else None]
        dist.broadcast_object_list(box, src=0, group=control_group())
        dist.gather_object(None, [None] * size if rank == 0 else None, dst=0, group=control_group())

    def ours() -> None:
        broadcast_control(("step", {}) if rank == 0 else None, world)
        gather_to_front(None, world)

    old, new = timed(objects), timed(ours)
    if rank == 0:
        print(f"{size} ranks, {rounds} rounds: pickled-object collectives {old:.3f} ms a round, "
              f"broadcast_control + gather_to_front {new:.3f} ms ({old / new:.1f}x)")
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--rounds", type=int, default=300)
    a = p.parse_args()
    mp.spawn(_rank, args=(a.ranks, a.rounds, free_port()), nprocs=a.ranks)


if __name__ == "__main__":
    main()
