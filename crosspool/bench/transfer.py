"""Hidden-state transfer cost between the KV pool and the weights pool (issue 8), per layer.

    python -m crosspool.bench.transfer [--kv-devices cuda:0] [--weights-devices cuda:1] [--hidden 2048]
        [--tokens 1,8,32,128,512] [--iters 200] [--json FILE]
    (CPU: --kv-ranks 1 --weights-ranks 1, over gloo)

One process per device, one torch.distributed world (NCCL on GPUs, NVLink multicast off). A decode layer
moves `tokens x hidden` bf16 from a KV rank to the weights ranks and the FFN output back. Measured per layer
(round trip, milliseconds, median of `--iters`):
- `p2p`: send/recv to one weights rank and back (NCCL point-to-point);
- `all_gather+all_reduce`: the collectives a tensor-parallel exchange could use instead: the hidden states
  all-gathered, the fp32 output all-reduced;
- `tick`: a whole `Exchange.ffn` call (`pools.transport`) with an FFN that does nothing, inside a round (the
  header on the host group, the hidden states out, the output back): what one layer's transfer costs the
  engine. The round's end (one "done" header per weights rank) is not in it: it is paid once per step;
- `pass`: a whole pass of `--layers` such calls as the engine runs decode with one KV rank (one header, then on
  a GPU one CUDA graph per side with the NCCL sends and receives inside: `Exchange.begin_pass`), divided by the
  layers (with one KV rank only; on CPU the same protocol eagerly).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from crosspool.bench import provenance
from crosspool.bench.traffic import sync
from crosspool.pools.transport import Exchange
from crosspool.pools.world import World, free_port, init_world


class _IdentityPool:
    """Stands in for a WeightsPool: the FFN returns its input (no compute, only the transfer)."""

    def ffn(self, name: str, layer: int, x: torch.Tensor) -> torch.Tensor:
        return x


def _time(fn, device: torch.device, iters: int) -> float:  # noqa: ANN001
    for _ in range(5):
        fn()
    times = []
    for _ in range(iters):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def _p2p(rank: int, kv_ranks: int, x: torch.Tensor, y: torch.Tensor) -> None:
    """KV rank 0 -> the first weights rank -> back."""
    if rank == 0:
        dist.send(x, kv_ranks)
        dist.recv(y, kv_ranks)
    elif rank == kv_ranks:
        dist.recv(y, 0)
        dist.send(y, 0)


def _collectives(gathered: list[torch.Tensor], x: torch.Tensor, partial: torch.Tensor) -> None:
    dist.all_gather(gathered, x)
    dist.all_reduce(partial)


def _tick_column(exchange: Exchange, world: World, rank: int, x: torch.Tensor, iters: int) -> float | None:
    """KV rank 0 times `Exchange.ffn` calls inside one round; the weights ranks serve that round."""
    result = None
    if rank == 0:
        result = _time(lambda: exchange.ffn(0, 0, x), x.device, iters)
    if world.is_kv:
        exchange.finish_round()
    else:
        exchange.serve_round(_IdentityPool(), ["m"])
    return result


class _PassGraphs:
    """Stands in for a model's `FFNGraphs` on a weights rank: a pass of identity FFNs, one CUDA graph (GPU)."""

    def __init__(self, x: torch.Tensor, layers: int, src: int) -> None:
        self.graph = None
        if x.device.type == "cuda":
            from crosspool.pools.world import lane_group

            self.x, self.outs = torch.empty_like(x), []
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                sends = []
                for _ in range(layers):
                    dist.irecv(self.x, src, group=lane_group(0)).wait()
                    self.outs.append(self.x.clone())
                    sends.append(dist.isend(self.outs[-1], src, group=lane_group(0)))
                for work in sends:
                    work.wait()
            torch.cuda.synchronize(x.device)

    def replay_pass(self, src: int, lane: int, rows: int) -> bool:
        if self.graph is None:
            return False                  # CPU: the weights rank serves the pass's layers eagerly
        self.graph.replay()
        return True


class _PassPool(_IdentityPool):
    def __init__(self, graphs: _PassGraphs, layers: int) -> None:
        self.graphs = {"m": graphs}
        self.models = {"m": SimpleNamespace(spec=SimpleNamespace(num_layers=layers))}   # what _serve_pass reads


def _pass_column(exchange: Exchange, world: World, rank: int, x: torch.Tensor, layers: int, iters: int
                 ) -> float | None:
    """Per layer, a whole pass as the engine's decode runs it with one KV rank (`Exchange.begin_pass`)."""
    if not exchange.passes:
        return None
    if not world.is_kv:
        pool = _PassPool(_PassGraphs(x, layers, 0), layers)
        exchange.serve_round(pool, ["m"])
        return None

    def calls() -> None:
        with exchange.pass_calls():
            for layer in range(layers):
                exchange.ffn(0, layer, x)

    graph = None
    if x.device.type == "cuda":
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            calls()
    replay = graph.replay if graph is not None else calls

    def one_pass() -> None:
        exchange.begin_pass(0, x.shape[0])
        replay()

    result = _time(one_pass, x.device, iters) / layers
    exchange.finish_round()
    return result


def _rank(rank: int, world_size: int, kv_ranks: int, devices: list[str], port: int, args: argparse.Namespace,
          out: dict) -> None:
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    device = torch.device(devices[rank])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    world = World(kv_ranks, world_size - kv_ranks, rank, device)
    init_world(world, f"tcp://127.0.0.1:{port}")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    exchange = Exchange(world, dtype)
    exchange.hidden_sizes.append(args.hidden)
    rows = []
    for tokens in (int(t) for t in args.tokens.split(",")):
        x = torch.randn(tokens, args.hidden, device=device).to(dtype)
        y = torch.empty_like(x)
        gathered = [torch.empty_like(x) for _ in range(world_size)]
        partial = torch.zeros(tokens, args.hidden, dtype=torch.float32, device=device)
        ops = {"p2p": functools.partial(_p2p, rank, kv_ranks, x, y),
               "all_gather+all_reduce": functools.partial(_collectives, gathered, x, partial)}
        row = {"tokens": tokens, "bytes": x.numel() * x.element_size()}
        for name, fn in ops.items():
            dist.barrier()
            row[name] = _time(fn, device, args.iters)
        dist.barrier()
        row["tick"] = _tick_column(exchange, world, rank, x, args.iters)
        dist.barrier()
        row["pass"] = _pass_column(exchange, world, rank, x, args.layers, max(10, args.iters // args.layers))
        rows.append(row)
    if rank == 0:
        out["rows"] = rows
    dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kv-devices", default=None)
    p.add_argument("--weights-devices", default=None)
    p.add_argument("--kv-ranks", type=int, default=1, help="CPU: KV ranks (gloo)")
    p.add_argument("--weights-ranks", type=int, default=1, help="CPU: weights ranks (gloo)")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--tokens", default="1,8,32,128,512")
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--layers", type=int, default=16, help="layers of the timed whole pass (the `pass` column)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    kv = args.kv_devices.split(",") if args.kv_devices else ["cpu"] * args.kv_ranks
    weights = args.weights_devices.split(",") if args.weights_devices else ["cpu"] * args.weights_ranks
    devices = kv + weights
    with mp.get_context("spawn").Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank, args=(len(devices), len(kv), devices, free_port(), args, out), nprocs=len(devices))
        rows = list(out["rows"])
    print(f"KV {kv} <-> weights {weights}, hidden {args.hidden}: round trip per layer, ms (median of {args.iters})")
    print("| tokens | KB each way | p2p | all_gather + all_reduce | tick (Exchange.ffn) | pass (per layer) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        per_layer = "" if r["pass"] is None else f"{r['pass']:.3f}"
        print(f"| {r['tokens']} | {r['bytes'] / 1024:.0f} | {r['p2p']:.3f} | {r['all_gather+all_reduce']:.3f} | "
              f"{r['tick']:.3f} | {per_layer} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**provenance.stamp(kv[0]), "kv": kv, "weights": weights, "hidden": args.hidden,
                       "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
