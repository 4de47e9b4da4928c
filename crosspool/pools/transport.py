"""Transport between KV-pool ranks (attention side) and weights-pool ranks (FFN side).

One process per device in one `torch.distributed` world: ranks [0, K) hold the KV pool (each a share of
the requests, data-parallel; rank 0 is also the front end), ranks [K, K+M) hold a tensor-parallel slice
of every model's FFN weights. gloo on CPU, NCCL on GPUs; `crosspool` starts the ranks itself on one
host, `torchrun` starts them across hosts (the same entry point, `python -m crosspool.pools.ranks`).

Work moves in *rounds*, one per engine step. At the start of a round rank 0 broadcasts a control
message (requests for each KV rank, models to load, shutdown). Then every rank runs *ticks* until all KV
ranks have finished their step. In a tick each KV rank offers at most one FFN call (model, layer, hidden
states [T, H]) or "done": the headers are all-gathered, the hidden states all-gathered (padded to the
largest), every weights rank computes its partial FFN for every offered call, and one all-reduce (fp32)
sums the partials back to the KV ranks. KV ranks with different models, layer counts or no work at all
stay in step because a finished rank keeps answering "done" until every KV rank is done.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from crosspool.models.loader import Shard
from crosspool.models.spec import ModelSpec
from crosspool.pools.weights_pool import WeightsPool

OP_DONE, OP_FFN = 0, 1
TIMEOUT = timedelta(minutes=10)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}


class RankError(RuntimeError):
    """Another rank of the world failed (its message and traceback are included)."""


@dataclass(frozen=True, slots=True)
class World:
    kv_ranks: int
    weights_ranks: int
    rank: int
    device: torch.device

    @property
    def size(self) -> int:
        return self.kv_ranks + self.weights_ranks

    @property
    def is_kv(self) -> bool:
        return self.rank < self.kv_ranks

    @property
    def shard(self) -> Shard:
        return Shard(self.rank - self.kv_ranks, self.weights_ranks)


def init_world(world: World, init_method: str) -> None:
    if world.device.type == "cuda":
        torch.cuda.set_device(world.device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // world.size))   # ranks share the host's cores
    backend = "nccl" if world.device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=init_method, rank=world.rank, world_size=world.size,
                            timeout=TIMEOUT)


def broadcast_control(msg: Any, world: World) -> Any:
    """Rank 0's control message, delivered to every rank."""
    box = [msg if world.rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_to_front(obj: Any, world: World) -> list[Any] | None:
    """Every rank's `obj` at rank 0 (None elsewhere)."""
    out: list[Any] | None = [None] * world.size if world.rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def raise_failures(results: list[Any]) -> None:
    failed = [r for r in results if isinstance(r, str) and r.startswith("rank ")]
    if failed:
        raise RankError("\n".join(failed))


@dataclass(eq=False)
class PendingFFN:
    """An FFN call whose hidden states have gone out (its tick's all-gather ran) and whose output has not
    come back yet (the all-reduce runs at `result()`, or when the next call starts)."""

    exchange: Exchange
    shape: torch.Size
    dtype: torch.dtype
    width: int
    out: torch.Tensor | None = None

    def result(self) -> torch.Tensor:
        if self.out is None:
            self.exchange.settle()
        assert self.out is not None
        return self.out


class Exchange:
    """The tick protocol. KV ranks call `ffn` (or `ffn_start` + `PendingFFN.result`) inside their step and
    `finish_round` after it; weights ranks call `serve_round` with their pool.

    A tick is: all-gather of every rank's header; if any KV rank asks for an FFN, all-gather of the hidden
    states, the weights ranks compute, all-reduce of the (fp32) outputs. A KV rank may split its tick: the
    gathers at `ffn_start`, the all-reduce when the result is needed, with its own work in between (the
    pipeline runs attention of another batch there). Collectives stay in one order on every rank: a new
    `ffn_start` first completes the outstanding tick."""

    def __init__(self, world: World, dtype: torch.dtype) -> None:
        self.world = world
        self.dtype = dtype
        self.device = world.device
        self.hidden_sizes: list[int] = []     # by model index; the same order on every rank
        self._outstanding: PendingFFN | None = None

    def _gather(self, header: list[int], x: torch.Tensor | None
                ) -> tuple[torch.Tensor, list[tuple[int, list[int]]], list[int], int, list[torch.Tensor]]:
        """The tick's gathers: (headers, FFN calls (KV rank, header), their sizes, the padded width, the
        gathered hidden states); no calls: width 0 and nothing gathered."""
        w = self.world
        mine = torch.tensor(header, dtype=torch.int64, device=self.device)
        parts = [torch.empty_like(mine) for _ in range(w.size)]
        dist.all_gather(parts, mine)           # plain all_gather: the same call on gloo and NCCL, any version
        headers = torch.stack(parts)
        kv = headers[: w.kv_ranks].tolist()
        calls = [(k, h) for k, h in enumerate(kv) if h[0] == OP_FFN]
        if not calls:
            return headers, calls, [], 0, []
        sizes = [h[3] * self.hidden_sizes[h[1]] for _, h in calls]
        width = max(sizes)
        send = torch.zeros(width, dtype=self.dtype, device=self.device)
        if x is not None:
            send[: x.numel()] = x.reshape(-1)
        gathered = [torch.empty_like(send) for _ in range(w.size)]
        dist.all_gather(gathered, send)
        return headers, calls, sizes, width, gathered

    def _tick(self, header: list[int], x: torch.Tensor | None, pool: WeightsPool | None = None,
              names: list[str] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A whole tick (gathers, the weights ranks' FFNs, the all-reduce)."""
        headers, calls, sizes, width, gathered = self._gather(header, x)
        if not calls:
            return headers, None
        out = torch.zeros(self.world.kv_ranks, width, dtype=torch.float32, device=self.device)
        if pool is not None:
            with torch.inference_mode():
                for (k, (_, model, layer, tokens)), n in zip(calls, sizes, strict=True):
                    xk = gathered[k][:n].view(tokens, self.hidden_sizes[model])
                    out[k, :n] = pool.ffn(names[model], layer, xk).float().reshape(-1)
        dist.all_reduce(out)
        return headers, out

    # ---- KV side --------------------------------------------------------------------------------
    def ffn_start(self, model: int, layer: int, x: torch.Tensor) -> PendingFFN:
        """Send x to the weights ranks for (model, layer)'s FFN; the output comes with `result()`."""
        self.settle()
        x = x.to(self.dtype).contiguous()
        _, calls, _, width, _ = self._gather([OP_FFN, model, layer, x.shape[0]], x)
        assert calls, "this rank's own call is in the tick"
        self._outstanding = PendingFFN(self, x.shape, x.dtype, width)
        return self._outstanding

    def settle(self) -> None:
        """Complete the outstanding tick, if any: the all-reduce that brings its FFN output back."""
        pending, self._outstanding = self._outstanding, None
        if pending is None:
            return
        out = torch.zeros(self.world.kv_ranks, pending.width, dtype=torch.float32, device=self.device)
        dist.all_reduce(out)
        pending.out = out[self.world.rank, : pending.shape.numel()].view(pending.shape).to(pending.dtype)

    def ffn(self, model: int, layer: int, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_start(model, layer, x).result().to(x.dtype)

    def finish_round(self) -> None:
        self.settle()
        while True:
            headers, _ = self._tick([OP_DONE, 0, 0, 0], None)
            if all(h == OP_DONE for h in headers[: self.world.kv_ranks, 0].tolist()):
                return

    # ---- weights side ---------------------------------------------------------------------------
    def serve_round(self, pool: WeightsPool, names: list[str]) -> None:
        while True:
            headers, _ = self._tick([OP_DONE, 0, 0, 0], None, pool, names)
            if all(h == OP_DONE for h in headers[: self.world.kv_ranks, 0].tolist()):
                return


class RemoteFFN:
    """One model's FFN, computed by the weights ranks (what `MoEModel.ffn` calls on a KV rank)."""

    def __init__(self, exchange: Exchange, index: int, spec: ModelSpec) -> None:
        self.exchange = exchange
        self.index = index
        self.spec = spec

    def forward(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return self.exchange.ffn(self.index, layer, x)

    def forward_start(self, layer: int, x: torch.Tensor) -> PendingFFN:
        """The FFN in flight on the weights ranks (the pipeline overlaps it with another batch's attention)."""
        return self.exchange.ffn_start(self.index, layer, x)


# ------------------------------------------------------------------------------------------------
# Weights ranks


def weights_rank_loop(world: World, dtype: torch.dtype) -> None:
    """Serve rounds until rank 0 says stop. Control messages: ("load", [(name, dir), ...], config),
    ("remove", name), ("step", ...), ("shutdown",)."""
    pool = WeightsPool(world.device, dtype, world.shard)
    exchange = Exchange(world, dtype)
    names: list[str] = []
    while True:
        msg = broadcast_control(None, world)
        kind = msg[0]
        if kind == "shutdown":
            return
        if kind == "load":
            error = None
            if len(msg) > 2:   # ("load", models, EngineConfig): the ranks run the configured kernels
                pool.kernels = msg[2].kernels
            try:
                for name, model_dir in msg[1]:
                    side = pool.load(name, model_dir)
                    names.append(name)
                    exchange.hidden_sizes.append(side.spec.hidden_size)
            except Exception:
                error = f"rank {world.rank} (weights): {traceback.format_exc()}"
            gather_to_front(error, world)
        elif kind == "remove":
            pool.remove(msg[1])
        elif kind == "step":
            exchange.serve_round(pool, names)
            gather_to_front(None, world)


# ------------------------------------------------------------------------------------------------
# Starting the world


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(kv_devices: list[str], weights_devices: list[str], dtype: torch.dtype) -> tuple[str, list]:
    """Start ranks 1.. as fresh interpreters (no fork of a process that may hold a CUDA context).
    Returns rank 0's init method and the processes."""
    init = f"tcp://127.0.0.1:{free_port()}"
    devices = kv_devices + weights_devices
    procs = []
    for rank in range(1, len(devices)):
        cmd = [sys.executable, "-m", "crosspool.pools.ranks", "--rank", str(rank),
               "--kv-ranks", str(len(kv_devices)), "--weights-ranks", str(len(weights_devices)),
               "--init", init, "--device", devices[rank], "--dtype", DTYPE_NAMES[dtype]]
        procs.append(subprocess.Popen(cmd))
    return init, procs


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
        dist.destroy_process_group()

