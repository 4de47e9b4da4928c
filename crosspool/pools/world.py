"""The process world of the pools: which rank is what, its process groups, the control messages of a round,
and starting and tearing it down.

One process per device in one `torch.distributed` world: ranks [0, K) hold the KV pool (each a share of the
requests, data-parallel; rank 0 is also the front end), ranks [K, K+M) hold a tensor-parallel slice of every
model's FFN weights. gloo on CPU, NCCL on GPUs; `crosspool` starts the ranks itself on one host (`spawn_ranks`),
`torchrun` starts them across hosts (the same entry point, `python -m crosspool.pools.ranks`). Groups: the
default one (NCCL on GPUs) carries eager hidden states; a gloo group of the same ranks carries control messages
and FFN headers (they never touch a device); one device group per *lane* carries the whole decode passes that
run at once (`pools.transport`). Work moves in rounds, one per engine step: rank 0 broadcasts a control message
(`broadcast_control`), every rank does its part, and rank 0 gathers what the KV ranks produced and any rank's
error (`gather_to_front`).
"""

from __future__ import annotations

import gc
import os
import pickle
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from crosspool.kernels._common import env_int
from crosspool.models.loader import Shard

_EMPTY_STEP, _PICKLED = 0, 1          # control messages: a step without commands, or a pickled message
TIMEOUT = timedelta(minutes=10)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

# concurrent whole passes (each lane: a communicator and a stream a side); every rank reads the same environment
LANES = max(1, env_int("CROSSPOOL_LANES", 2))
_control: dist.ProcessGroup | None = None   # the host (gloo) group over every rank: control messages, headers
_lanes: list[dist.ProcessGroup] = []        # per lane, a device group over every rank (its own communicator)


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

    @property
    def weights(self) -> range:
        return range(self.kv_ranks, self.size)


def init_world(world: World, init_method: str) -> None:
    """Join the world: the default group (NCCL on GPUs, gloo on CPU) carries hidden states; a gloo group of
    the same ranks carries control messages and FFN headers, so they never touch a device (no host sync to
    read a header, no device copy of a pickled message)."""
    global _control, _lanes
    if world.device.type == "cuda":
        torch.cuda.set_device(world.device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // world.size))   # ranks share the host's cores
    backend = "nccl" if world.device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=init_method, rank=world.rank, world_size=world.size,
                            timeout=TIMEOUT)
    _control = dist.new_group(backend="gloo", timeout=TIMEOUT)
    _lanes = [dist.new_group(backend=backend, timeout=TIMEOUT) for _ in range(LANES)]
    if backend == "nccl":
        # one collective now builds the device group's communicator on every rank, so that the first
        # operation on it is never a point-to-point one between two ranks only
        dist.all_reduce(torch.zeros(1, device=world.device))
        connect_pairs(world)


def connect_pairs(world: World) -> None:
    """One exchange between every KV rank and every weights rank, now: NCCL sets up a pair's point-to-point
    connection on its first message, which must not happen inside a CUDA graph capture (whole-pass graphs).
    Pairs go in (KV rank, weights rank) order on every rank, so no two ranks wait on each other in a cycle."""
    buf = torch.zeros(1 << 18, device=world.device)            # 1 MiB: the sizes decode passes send
    peers = world.weights if world.is_kv else range(world.kv_ranks)
    for group in [None, *_lanes]:
        for peer in peers:
            if world.is_kv:
                dist.send(buf, peer, group=group)
                dist.recv(buf, peer, group=group)
            else:
                dist.recv(buf, peer, group=group)
                dist.send(buf, peer, group=group)
    torch.cuda.synchronize(world.device)


def leave_world(world: World, wait_s: float = 60.0) -> None:
    """Tear the world down. Graphs that captured NCCL operations must be gone first (the callers drop them:
    NCCL keeps a captured operation's resources while its graph lives, and the teardown waits for them). If
    the teardown still does not finish in `wait_s`, the communicators are aborted instead of waiting forever."""
    gc.collect()
    if world.device.type == "cuda":
        torch.cuda.synchronize(world.device)
    teardown = threading.Thread(target=dist.destroy_process_group, daemon=True)
    teardown.start()
    teardown.join(wait_s)
    if teardown.is_alive():
        print(f"rank {world.rank}: the process group's teardown did not finish in {wait_s:.0f} s: aborting it",
              file=sys.stderr, flush=True)
        from torch.distributed.distributed_c10d import _abort_process_group

        _abort_process_group()


def control_group() -> dist.ProcessGroup:
    assert _control is not None, "init_world first"
    return _control


def lane_group(lane: int) -> dist.ProcessGroup:
    assert _lanes, "init_world first"
    return _lanes[lane]


def broadcast_control(msg: Any, world: World) -> Any:
    """Rank 0's control message, delivered to every rank. Once per engine step, so the common one (a step with
    no commands) is one broadcast of two ints; any other goes pickled after them."""
    head = torch.zeros(2, dtype=torch.int64)            # [kind, payload bytes]
    payload = None
    if world.rank == 0 and not (msg[0] == "step" and not msg[1]):
        payload = torch.frombuffer(bytearray(pickle.dumps(msg)), dtype=torch.uint8)
        head[0], head[1] = _PICKLED, payload.numel()
    dist.broadcast(head, 0, group=control_group())
    kind, size = head.tolist()
    if kind == _EMPTY_STEP:
        return ("step", {})
    if payload is None:
        payload = torch.empty(size, dtype=torch.uint8)
    dist.broadcast(payload, 0, group=control_group())
    return msg if world.rank == 0 else pickle.loads(payload.numpy().tobytes())


def gather_to_front(obj: Any, world: World) -> list[Any] | None:
    """Every rank's `obj` at rank 0 (None elsewhere). Once per engine step: the sizes travel in one gather of
    ints, and only the ranks with something to say (not None) send it, pickled, point to point."""
    data = b"" if obj is None else pickle.dumps(obj)
    size = torch.tensor([len(data)], dtype=torch.int64)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world.size)] if world.rank == 0 else None
    dist.gather(size, sizes, dst=0, group=control_group())
    if world.rank != 0:
        if data:
            # nothing else goes from this rank to rank 0 on the host group (headers go to weights ranks)
            dist.send(torch.frombuffer(bytearray(data), dtype=torch.uint8), 0, group=control_group())
        return None
    out: list[Any] = [obj] + [None] * (world.size - 1)
    for rank in range(1, world.size):
        n = int(sizes[rank].item())
        if n:
            buf = torch.empty(n, dtype=torch.uint8)
            dist.recv(buf, rank, group=control_group())
            out[rank] = pickle.loads(buf.numpy().tobytes())
    return out


def raise_failures(results: list[Any]) -> None:
    failed = [r for r in results if isinstance(r, str) and r.startswith("rank ")]
    if failed:
        raise RankError("\n".join(failed))


def dump_stacks_later() -> None:
    """With CROSSPOOL_DUMP_STACKS_S=N set, print every thread's stack to stderr after N seconds (and every N
    seconds after): where a rank waits when a run across ranks makes no progress."""
    after = os.environ.get("CROSSPOOL_DUMP_STACKS_S")
    if after:
        import faulthandler

        faulthandler.dump_traceback_later(float(after), repeat=True)


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
