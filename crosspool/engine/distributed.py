"""Engine over several processes: KV-pool ranks (data-parallel over requests) and weights-pool ranks.

`DistributedEngine` runs on rank 0 with the same interface as `Engine`: it is the front end (validates
and assigns each request to one KV rank, so a request's KV lives on one device and no KV head is ever
replicated) and KV rank 0. Every `step()` is one round of the transport: rank 0 broadcasts the new
requests and aborts for each KV rank, every KV rank runs one engine step (its FFN calls go to the
weights ranks point to point, `pools.transport.Exchange`), and the outputs come back to rank 0.
"""

from __future__ import annotations

import atexit
import dataclasses
import itertools
import os
import subprocess
import traceback
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist

from crosspool.config import EngineConfig
from crosspool.engine.engine import Engine, RequestError
from crosspool.engine.output import RequestOutput
from crosspool.engine.sampling import SamplingParams
from crosspool.pools.transport import Exchange
from crosspool.pools.world import (
    World,
    broadcast_control,
    gather_to_front,
    init_world,
    leave_world,
    raise_failures,
    spawn_ranks,
)

T = TypeVar("T")


class DistributedEngine:
    def __init__(self, models: dict[str, str | os.PathLike[str]], config: EngineConfig) -> None:
        self.config = config
        kv_devices = list(config.kv_devices) or [config.device]
        weights_devices = list(config.weights_devices)
        self.procs: list[subprocess.Popen] = []
        if dist.is_torchelastic_launched():
            init = "env://"
            if int(os.environ["WORLD_SIZE"]) != len(kv_devices) + len(weights_devices):
                raise ValueError(f"torchrun world has {os.environ['WORLD_SIZE']} ranks, the layout needs "
                                 f"{len(kv_devices)} KV + {len(weights_devices)} weights ranks")
        else:
            init, self.procs = spawn_ranks(kv_devices, weights_devices, config.dtype)
        self.world = World(len(kv_devices), len(weights_devices), 0, torch.device(kv_devices[0]))
        init_world(self.world, init)
        self.exchange = Exchange(self.world, config.dtype)
        items = [(name, str(path)) for name, path in models.items()]
        broadcast_control(("load", items, config), self.world)
        error = None
        try:
            self.local = Engine(dict(items), dataclasses.replace(config, device=kv_devices[0]), self.exchange)
            self.local.capture_graphs()      # attention sub-step graphs (no FFN inside: nothing crosses ranks)
        except Exception:
            error = f"rank 0 (kv): {traceback.format_exc()}"
        raise_failures(gather_to_front(error, self.world))
        self.models = self.local.models
        self.kv_pool = self.local.kv_pool
        self.device = self.local.device
        self._rank_of: dict[str, int] = {}           # unfinished request id -> KV rank
        self._load = [0] * self.world.kv_ranks       # outstanding tokens per KV rank
        self._cost: dict[str, int] = {}
        self._prompts: dict[str, str] = {}
        self._commands: dict[int, list[tuple]] = {}
        self._ids = itertools.count()
        self._closed = False
        atexit.register(self.close)    # never leave the other ranks waiting for a shutdown

    # ---- requests ------------------------------------------------------------------------------
    def add_request(self, model: str, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        params = params or SamplingParams()
        text, ids = self.local.tokenize(model, prompt)
        self.local.validate_request(model, ids, params)
        if request_id is None:
            request_id = f"req-{next(self._ids)}"
            while request_id in self._rank_of or self.local.has_request(request_id):
                request_id = f"req-{next(self._ids)}"
        elif request_id in self._rank_of or self.local.has_request(request_id):
            raise RequestError(f"duplicate request id {request_id!r}")
        rank = min(range(self.world.kv_ranks), key=lambda r: self._load[r])   # least outstanding tokens
        if rank == 0:
            self.local.add_request(model, ids, params, request_id)
        else:
            self._commands.setdefault(rank, []).append(("add", model, ids, params, request_id))
        self._prompts[request_id] = text
        self._rank_of[request_id] = rank
        self._cost[request_id] = len(ids) + params.max_tokens
        self._load[rank] += self._cost[request_id]
        return request_id

    def abort(self, request_id: str) -> None:
        rank = self._rank_of.pop(request_id, None)
        if rank is None:
            return
        self._load[rank] -= self._cost.pop(request_id)
        self._prompts.pop(request_id, None)
        if rank == 0:
            self.local.abort(request_id)
        else:
            self._commands.setdefault(rank, []).append(("abort", request_id))

    def has_unfinished(self) -> bool:
        return bool(self._rank_of) or self.local.has_unfinished()

    # ---- the loop ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        commands, self._commands = self._commands, {}
        outputs, gathered = self._round(commands, lambda: self.local.step() if self.local.has_unfinished() else [])
        for part in gathered[1: self.world.kv_ranks]:
            outputs += part or []
        for out in outputs:
            out.prompt = self._prompts.get(out.request_id, out.prompt)
            if out.finished and out.request_id in self._rank_of:
                self._load[self._rank_of.pop(out.request_id)] -= self._cost.pop(out.request_id)
                self._prompts.pop(out.request_id, None)
        return outputs

    def _round(self, commands: dict[int, list[tuple]], work: Callable[[], T]) -> tuple[T, list]:
        """One round: other ranks get their commands and step; rank 0 runs `work` (which may call the
        FFN on the weights ranks) in the same round."""
        broadcast_control(("step", commands), self.world)
        try:
            result = work()
        except BaseException:
            # end the round for every rank (no weights rank left waiting for calls that will not come), then
            # report the error; the other ranks' results of this round are dropped
            self.exchange.abandon_round()
            raise_failures(gather_to_front(None, self.world))
            raise
        self.exchange.finish_round()
        gathered = gather_to_front(None, self.world)
        raise_failures(gathered)        # another KV rank's step failed (it ended its round too)
        return result, gathered

    def run_in_round(self, work: Callable[[], T]) -> T:
        """Run `work` on rank 0 inside a round of its own (tools and tests that drive the model)."""
        return self._round({}, work)[0]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        broadcast_control(("shutdown",), self.world)
        self.local.close()
        leave_world(self.world)
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


def kv_rank_loop(world: World, dtype: torch.dtype) -> None:
    """KV ranks 1..K-1: an Engine over this rank's share of the requests, driven round by round."""
    exchange = Exchange(world, dtype)
    engine: Engine | None = None
    while True:
        msg = broadcast_control(None, world)
        if msg[0] == "shutdown":
            if engine is not None:
                engine.close()
            return
        if msg[0] == "load":
            _, items, config = msg
            error = None
            try:
                engine = Engine(dict(items), dataclasses.replace(config, device=str(world.device)), exchange)
                engine.capture_graphs()
            except Exception:
                error = f"rank {world.rank} (kv): {traceback.format_exc()}"
            gather_to_front(error, world)
        elif msg[0] == "step":
            assert engine is not None
            for cmd in msg[1].get(world.rank, []):
                if cmd[0] == "add":
                    _, model, ids, params, rid = cmd
                    engine.add_request(model, ids, params, rid)
                else:
                    engine.abort(cmd[1])
            try:
                outputs = engine.step() if engine.has_unfinished() else []
            except Exception:
                exchange.abandon_round()
                gather_to_front(f"rank {world.rank} (kv): {traceback.format_exc()}", world)
                continue
            exchange.finish_round()
            gather_to_front(outputs or None, world)     # nothing to send when no request made progress
