"""Transport between the KV-cache pool (attention side) and weights-pool ranks (FFN side).

One process per device in one `torch.distributed` world: rank 0 is the KV rank (it runs the engine),
ranks 1..M hold a tensor-parallel slice of every model's FFN weights. Per layer the KV rank broadcasts a
small header and the normed hidden states; every weights rank computes its partial FFN output and the
partials are summed onto the KV rank with a reduce (fp32, so the sum loses nothing to the split).
gloo on CPU, NCCL on GPUs. `crosspool` spawns the weights ranks itself on one host; under `torchrun`
the same worker loop runs in the ranks torchrun starts (`crosspool.cli` routes rank > 0 there).
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

import torch
import torch.distributed as dist

from crosspool.config import EngineConfig
from crosspool.models.loader import Shard
from crosspool.models.spec import ModelSpec
from crosspool.pools.weights_pool import WeightsPool

OP_SHUTDOWN, OP_FFN, OP_LOAD, OP_REMOVE = 0, 1, 2, 3
KV_RANK = 0
TIMEOUT = timedelta(minutes=10)
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}


class WeightsRankError(RuntimeError):
    """A weights-pool rank failed (its message and traceback are included)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


@dataclass(frozen=True, slots=True)
class WorkerArgs:
    rank: int
    world: int
    init_method: str
    device: str
    dtype: torch.dtype


def weights_worker(args: WorkerArgs) -> None:
    """A weights-pool rank: load FFN shards on request, then serve FFN calls until shutdown."""
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)   # CPU ranks share the host's cores with the KV rank
    dist.init_process_group(_backend(device), init_method=args.init_method, rank=args.rank,
                            world_size=args.world, timeout=TIMEOUT)
    pool = WeightsPool(device, args.dtype, Shard(args.rank - 1, args.world - 1))
    names: list[str] = []
    header = torch.zeros(5, dtype=torch.int64, device=device)
    try:
        while True:
            dist.broadcast(header, src=KV_RANK)
            op = int(header[0])
            if op == OP_SHUTDOWN:
                break
            if op == OP_FFN:
                _serve_ffn(pool, names, header, device)
            elif op == OP_LOAD:
                msg = [None]
                dist.broadcast_object_list(msg, src=KV_RANK)
                name, model_dir = msg[0]
                error = None
                try:
                    pool.load(name, model_dir)
                    names.append(name)
                except Exception:   # reported to the KV rank, which raises it
                    error = f"weights rank {args.rank}: {traceback.format_exc()}"
                dist.gather_object(error, None, dst=KV_RANK)
            elif op == OP_REMOVE:
                idx = int(header[1])
                pool.remove(names[idx])
                names[idx] = ""
    finally:
        dist.destroy_process_group()


def _serve_ffn(pool: WeightsPool, names: list[str], header: torch.Tensor, device: torch.device) -> None:
    _, model, layer, tokens, code = header.tolist()
    name = names[model]
    hidden = pool.models[name].spec.hidden_size
    x = torch.empty(tokens, hidden, dtype=CODE_DTYPES[code], device=device)
    dist.broadcast(x, src=KV_RANK)
    with torch.inference_mode():
        y = pool.ffn(name, layer, x).float()
    dist.reduce(y, dst=KV_RANK, op=dist.ReduceOp.SUM)


class RemoteFFN:
    """One model's FFN, computed by the weights ranks (what `MoEModel.ffn` calls)."""

    def __init__(self, pool: RemoteWeightsPool, index: int, spec: ModelSpec) -> None:
        self.pool = pool
        self.index = index
        self.spec = spec

    def forward(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return self.pool.ffn(self.index, layer, x)


class RemoteWeightsPool:
    """The KV rank's handle on the weights ranks: starts them, loads models, runs FFN round trips."""

    def __init__(self, config: EngineConfig) -> None:
        self.device = torch.device(config.device)
        self.ranks = config.weights_ranks
        world = self.ranks + 1
        devices = list(config.weights_devices) or [config.device] * self.ranks
        self.procs: list[subprocess.Popen] = []
        if dist.is_torchelastic_launched():
            init = "env://"   # torchrun started the weights ranks already
            if int(os.environ["WORLD_SIZE"]) != world:
                raise ValueError(f"torchrun world has {os.environ['WORLD_SIZE']} ranks, layout needs {world}")
        else:
            init = f"tcp://127.0.0.1:{_free_port()}"
            dtype = {v: k for k, v in _DTYPE_NAMES.items()}[config.dtype]
            for r in range(1, world):
                # a fresh interpreter per rank (no fork of a process holding a CUDA context)
                cmd = [sys.executable, "-m", "crosspool.pools.transport", "--rank", str(r), "--world", str(world),
                       "--init", init, "--device", devices[r - 1], "--dtype", dtype]
                self.procs.append(subprocess.Popen(cmd))
        dist.init_process_group(_backend(self.device), init_method=init, rank=KV_RANK, world_size=world,
                                timeout=TIMEOUT)
        self.names: list[str] = []
        self._header = torch.zeros(5, dtype=torch.int64, device=self.device)
        self._closed = False

    def _send_header(self, op: int, model: int = 0, layer: int = 0, tokens: int = 0, code: int = 0) -> None:
        self._header.copy_(torch.tensor([op, model, layer, tokens, code]))
        dist.broadcast(self._header, src=KV_RANK)

    def load(self, name: str, model_dir: str | os.PathLike[str], spec: ModelSpec) -> RemoteFFN:
        self._send_header(OP_LOAD)
        dist.broadcast_object_list([(name, str(model_dir))], src=KV_RANK)
        errors: list[str | None] = [None] * (self.ranks + 1)
        dist.gather_object(None, errors, dst=KV_RANK)
        failed = [e for e in errors if e]
        if failed:
            raise WeightsRankError("\n".join(failed))
        self.names.append(name)
        return RemoteFFN(self, len(self.names) - 1, spec)

    def remove(self, name: str) -> None:
        idx = self.names.index(name)
        self._send_header(OP_REMOVE, idx)
        self.names[idx] = ""

    def ffn(self, index: int, layer: int, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        self._send_header(OP_FFN, index, layer, x.shape[0], DTYPE_CODES[x.dtype])
        dist.broadcast(x, src=KV_RANK)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)   # the KV rank adds nothing
        dist.reduce(out, dst=KV_RANK, op=dist.ReduceOp.SUM)
        return out.to(x.dtype)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._send_header(OP_SHUTDOWN)
        dist.destroy_process_group()
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


_DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="a weights-pool rank (started by crosspool or torchrun)")
    p.add_argument("--rank", type=int, default=None)
    p.add_argument("--world", type=int, default=None)
    p.add_argument("--init", default="env://")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(_DTYPE_NAMES))
    a = p.parse_args(argv)
    rank = a.rank if a.rank is not None else int(os.environ["RANK"])
    world = a.world if a.world is not None else int(os.environ["WORLD_SIZE"])
    weights_worker(WorkerArgs(rank, world, a.init, a.device, _DTYPE_NAMES[a.dtype]))


if __name__ == "__main__":
    main()
