"""Transport between KV-pool ranks (attention side) and weights-pool ranks (FFN side): the FFN protocol
(`Exchange`), the FFN a KV rank's model calls (`RemoteFFN`), and the weights ranks' loop. The world it runs in
(ranks, groups, rounds, control messages) is `pools.world`.

Work moves in *rounds*, one per engine step. At the start of a round rank 0 broadcasts a control
message (requests for each KV rank, models to load, shutdown; `world.broadcast_control`). Then every KV rank
runs its step, sending each
FFN call (model, layer, hidden states [T, H]) to every weights rank point to point: a 4-int header on the
host (gloo) group, then the hidden states; it posts the receive of each weights rank's output (an fp32
partial when the weights are tensor-parallel; the KV rank sums them). Nothing on the KV side waits for the
device or for another rank until the output is needed. A weights rank serves headers in the order they
arrive from any KV rank, so KV ranks never wait for each other; a KV rank ends its round with a "done"
header to every weights rank, and a weights rank's round ends when every KV rank is done.

With one KV rank, a pass (one batch through every layer) is announced: one header and one plan message carry all of its
calls, (model, layer, rows) in the order they will come, so the weights rank's host queues the whole pass
(receive, FFN, send for each layer) at once and never waits on the host per layer; its device then runs the
layers as the hidden states arrive. The pipeline scheduler announces the calls of its interleaved passes
in its own order. A call that was not announced carries its own header. `CROSSPOOL_FFN_PLAN=0` turns the
announcements off (every call with its header, as before them: for before/after measurements).

With one KV rank a lone decode pass goes further: each side runs it as ONE CUDA graph per (model, bucket) with
the NCCL sends and receives captured inside (`engine.graphs.DecodeGraphs` on the KV rank, `FFNGraphs` passes on
a weights rank). The KV rank sends one header (OP_PASS: model, rows) and replays its graph; the weights rank's
host reads the header and replays the matching graph; the two graphs' NCCL operations pair up on the devices,
layer by layer, with no host in between. On CPU the same protocol runs eagerly (the calls of a pass carry no
header). `CROSSPOOL_PASS_GRAPHS=0` turns it off (decode then goes through the sub-step graphs and plans).

Passes run in *lanes*: lane l has its own NCCL communicator (a process group of every rank) and its own stream
on each side, so the passes of two models in two lanes run at once and pair up independently; while one
model's layer waits for its FFN on the other GPU, the other lane's kernels use the device. That is the
layer-wise pipeline across ranks (`Engine` puts the models of a step in lanes when `EngineConfig.pipeline` is
on). Eager traffic (prefill, other calls) stays on the default group.
"""

from __future__ import annotations

import os
import traceback
from collections import deque
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from crosspool.models.spec import ModelSpec
from crosspool.pools.weights_pool import WeightsPool
from crosspool.pools.world import (
    LANES,
    RankError,
    World,
    broadcast_control,
    control_group,
    gather_to_front,
    lane_group,
)

OP_DONE, OP_FFN, OP_PLAN, OP_PASS = 0, 1, 2, 3
# [op, model, layer, tokens]; OP_PLAN: [op, calls, 0, 0], then the plan; OP_PASS: [op, model, 0, rows]
HEADER_INTS = 4
PLANS = os.environ.get("CROSSPOOL_FFN_PLAN", "1") != "0"


@dataclass(eq=False)
class PendingFFN:
    """An FFN call whose hidden states are on their way to the weights ranks and whose output (one buffer per
    weights rank) is being received; `result()` waits for it (on a GPU: the current stream waits, the host
    does not) and sums the partials of tensor-parallel weights ranks."""

    exchange: Exchange
    works: list[dist.Work]
    parts: torch.Tensor                   # [weights ranks, T, H]
    sent: torch.Tensor                    # the hidden states, alive until their send completes
    dtype: torch.dtype
    out: torch.Tensor | None = None

    def result(self) -> torch.Tensor:
        if self.out is None:
            for work in self.works:
                work.wait()
            self.exchange._in_flight.remove(self)
            out = self.parts[0] if self.parts.shape[0] == 1 else self.parts.sum(0)
            self.out = out.to(self.dtype)
        return self.out


class Exchange:
    """The FFN protocol. KV ranks call `ffn` (or `ffn_start` + `PendingFFN.result`) inside their step and
    `finish_round` after it; weights ranks call `serve_round` with their pool.

    Per FFN call a KV rank sends, to every weights rank, a header on the host group and the hidden states on
    the default group, and posts the receive of the output: 2 messages out and 1 in per weights rank, no
    collective, no host sync. Calls may overlap (the pipeline starts another batch's FFN before it reads the
    first): each has its own buffers, and every pair of ranks handles its messages in send order. A round
    costs one more header per weights rank ("done")."""

    def __init__(self, world: World, dtype: torch.dtype) -> None:
        self.world = world
        self.dtype = dtype
        self.device = world.device
        self.hidden_sizes: list[int] = []     # by model index; the same order on every rank
        self.messages_sent = 0                # point-to-point messages this rank has sent (headers included)
        self._in_flight: list[PendingFFN] = []
        self._headers: list[tuple[dist.Work, torch.Tensor]] = []   # header sends not yet waited for
        self._announced: deque[tuple[int, int, int]] = deque()    # (model, layer, rows) told, not yet sent
        self.plans_sent = 0
        self.passes_sent = 0
        # whole decode passes as one graph per side (`begin_pass`): one KV rank only, for the reason
        # `announce` gives
        self.passes = os.environ.get("CROSSPOOL_PASS_GRAPHS", "1") != "0" and world.kv_ranks == 1
        self.lanes = LANES if self.passes else 1
        self._pass: str | None = None         # inside `pass_calls`: "live" or "rehearse"
        self._lane = 0                        # the lane of the pass inside `pass_calls`
        self._streams: dict[int, torch.cuda.Stream] = {}

    @property
    def out_dtype(self) -> torch.dtype:
        # one weights rank sends the output itself; several send fp32 partials that the KV rank sums
        return self.dtype if self.world.weights_ranks == 1 else torch.float32

    def _send_header(self, header: list[int]) -> None:
        h = torch.tensor(header, dtype=torch.int64)
        for w in self.world.weights:
            self._headers.append((dist.isend(h, w, group=control_group()), h))
        self.messages_sent += self.world.weights_ranks

    # ---- KV side --------------------------------------------------------------------------------
    def announce(self, calls: list[tuple[int, int, int]]) -> None:
        """Tell the weights ranks this rank's next FFN calls, (model, layer, rows) in the order `ffn_start`
        will make them: one header and one plan message for all of them, none per call.

        Only with one KV rank. A weights rank works through a plan in order, so with several KV ranks and
        tensor-parallel weights ranks two weights ranks could each be inside another KV rank's plan, each
        waiting for hidden states that need the other's output first (a deadlock, seen over gloo); and with
        one weights rank whole passes of different KV ranks would queue behind each other. Per-call headers
        (served in arrival order, each call's hidden states already on their way) have neither problem."""
        if not calls or self.world.kv_ranks > 1 or not PLANS or self._pass is not None:
            return
        if self._announced:
            raise RankError(f"announcing {len(calls)} FFN calls while {len(self._announced)} announced ones are "
                            f"not made yet (next: {self._announced[0]})")
        plan = torch.tensor(calls, dtype=torch.int64).flatten()
        self._send_header([OP_PLAN, len(calls), 0, 0])
        for w in self.world.weights:
            self._headers.append((dist.isend(plan, w, group=control_group()), plan))
        self.messages_sent += self.world.weights_ranks
        self._announced.extend(calls)
        self.plans_sent += 1

    def begin_pass(self, model: int, rows: int, lane: int = 0) -> None:
        """Tell the weights ranks that a whole pass of `model` follows in `lane`, `rows` rows a layer: its
        calls, made inside `pass_calls(lane=lane)`, carry no header (a weights rank replays its graph of the
        pass on the lane's stream, or serves the layers in order)."""
        if not self.passes:
            raise RankError("whole passes need one KV rank (and CROSSPOOL_PASS_GRAPHS unset or 1)")
        if not 0 <= lane < self.lanes:
            raise RankError(f"lane {lane} of {self.lanes}")
        if self._announced:
            raise RankError(f"a pass begins while {len(self._announced)} announced FFN calls are not made")
        self._send_header([OP_PASS, model, lane, rows])
        self.passes_sent += 1

    @contextmanager
    def pass_calls(self, rehearse: bool = False, lane: int = 0) -> Iterator[None]:
        """FFN calls of a pass told by `begin_pass` (or captured into a graph whose replays follow it), on
        the lane's communicator. rehearse: a run outside a capture (the one before it, which compiles the
        kernels) sends nothing and reads zeros as the FFN output; calls inside the capture record the NCCL
        operations."""
        self._pass, self._lane = ("rehearse" if rehearse else "live"), lane
        try:
            yield
        finally:
            self._pass, self._lane = None, 0

    def lane_stream(self, lane: int) -> torch.cuda.Stream | None:
        """The stream this rank runs the lane's passes on (None on CPU: everything runs in order)."""
        if self.device.type != "cuda":
            return None
        if lane not in self._streams:
            self._streams[lane] = torch.cuda.Stream(self.device)
        return self._streams[lane]

    def ffn_start(self, model: int, layer: int, x: torch.Tensor) -> PendingFFN:
        """Send x to the weights ranks for (model, layer)'s FFN; the output comes with `result()`."""
        x = x.to(self.dtype).contiguous()
        capturing = self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        if self._pass == "rehearse" and not capturing:
            parts = torch.zeros(self.world.weights_ranks, *x.shape, dtype=self.out_dtype, device=self.device)
            pending = PendingFFN(self, [], parts, x, x.dtype)
            self._in_flight.append(pending)
            return pending
        if self._pass is None:     # inside a pass the weights ranks were told every call (`begin_pass`)
            self._header_for(model, layer, x.shape[0])
        parts = torch.empty(self.world.weights_ranks, *x.shape, dtype=self.out_dtype, device=self.device)
        # plain isend/irecv on both sides (not batch_isend_irecv): NCCL may run batched point-to-point on
        # another communicator than single operations, and the two sides must match
        group = lane_group(self._lane) if self._pass is not None else None
        works = [dist.isend(x, w, group=group) for w in self.world.weights]
        works += [dist.irecv(parts[i], w, group=group) for i, w in enumerate(self.world.weights)]
        self.messages_sent += self.world.weights_ranks
        pending = PendingFFN(self, works, parts, x, x.dtype)
        self._in_flight.append(pending)
        return pending

    def _header_for(self, model: int, layer: int, rows: int) -> None:
        """Tell the weights ranks of one call: its announced entry, or a header of its own."""
        if not self._announced:
            self._send_header([OP_FFN, model, layer, rows])
            return
        told = self._announced.popleft()
        if told != (model, layer, rows):
            # the weights ranks queue the announced calls: another one here would pair the wrong messages
            raise RankError(f"FFN call (model {model}, layer {layer}, {rows} rows) where (model, layer, rows) "
                            f"{told} was announced")

    def ffn(self, model: int, layer: int, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_start(model, layer, x).result().to(x.dtype)

    def finish_round(self) -> None:
        """Complete every call still in flight and tell the weights ranks this rank is done."""
        if self._announced:
            raise RankError(f"round ends with {len(self._announced)} announced FFN calls not made "
                            f"(next: {self._announced[0]}): the weights ranks wait for them")
        for pending in list(self._in_flight):
            pending.result()
        self._send_header([OP_DONE, 0, 0, 0])
        for work, _ in self._headers:
            work.wait()
        self._headers.clear()

    def abandon_round(self) -> None:
        """End the round after this rank's step failed part way: the announced calls not made yet go out with
        zero rows (the weights ranks queued them and wait for their hidden states), calls in flight complete
        and their outputs are dropped, and the weights ranks get "done" as after any round, so the world stays
        in step and the error can be reported instead of every rank waiting for the timeout."""
        self._pass = None
        while self._announced:
            model, layer, rows = self._announced[0]
            x = torch.zeros(rows, self.hidden_sizes[model], dtype=self.dtype, device=self.device)
            self.ffn_start(model, layer, x)
        self.finish_round()

    # ---- weights side ---------------------------------------------------------------------------
    def serve_round(self, pool: WeightsPool, names: list[str]) -> None:
        """Serve FFN calls from any KV rank, in arrival order, until every KV rank is done. The host waits
        only for headers; receives, the FFN and the sends queue on the device."""
        header = torch.empty(HEADER_INTS, dtype=torch.int64)
        sends: list[tuple[dist.Work, torch.Tensor]] = []    # outputs on their way, alive until sent
        done = 0
        while done < self.world.kv_ranks:
            src = dist.recv(header, group=control_group())
            op, model, layer, tokens = header.tolist()
            if op == OP_DONE:
                done += 1
            elif op == OP_PASS:
                sends += self._serve_pass(pool, names, src, model, tokens, lane=layer)
            elif op == OP_PLAN:    # a pass (or the pipeline's passes): queue every call now, in order
                plan = torch.empty(3 * model, dtype=torch.int64)
                dist.recv(plan, src, group=control_group())
                for call in plan.view(-1, 3).tolist():
                    sends.append(self._serve(pool, names, src, *call))
            else:
                sends.append(self._serve(pool, names, src, model, layer, tokens))
        for work, _ in sends:
            work.wait()

    def _serve_pass(self, pool: WeightsPool, names: list[str], src: int, model: int, rows: int, lane: int
                    ) -> list[tuple[dist.Work, torch.Tensor]]:
        """A whole pass (OP_PASS) in `lane`: one replay of its graph on the lane's stream, whose receives and
        sends pair with the KV rank's replay on the devices; without a graph for it (CPU, other sizes), every
        layer queued in order on the lane's communicator."""
        graphs = pool.graphs.get(names[model])
        layers = pool.models[names[model]].spec.num_layers
        stream = self.lane_stream(lane)
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(self.device))    # eager calls queued before it
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            if graphs is not None and graphs.replay_pass(src, lane, rows):
                self.messages_sent += layers
                return []
            return [self._serve(pool, names, src, model, layer, rows, lane_group(lane)) for layer in range(layers)]

    def _serve(self, pool: WeightsPool, names: list[str], src: int, model: int, layer: int, tokens: int,
               group: dist.ProcessGroup | None = None) -> tuple[dist.Work, torch.Tensor]:
        """Queue one call: receive its hidden states, run the FFN, send the output back (nothing waits on
        the host: the receive makes the stream wait, the send waits for the stream)."""
        if group is None and self._streams:
            # an eager call after passes: the device runs it after them (their communicators are others,
            # but a model's static FFN buffers are shared)
            for stream in self._streams.values():
                torch.cuda.current_stream(self.device).wait_stream(stream)
        x = torch.empty(tokens, self.hidden_sizes[model], dtype=self.dtype, device=self.device)
        dist.recv(x, src, group=group)
        with torch.inference_mode():
            y = pool.ffn(names[model], layer, x).to(self.out_dtype).contiguous()
        self.messages_sent += 1
        return dist.isend(y, src, group=group), y


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

    def announce(self, rows: int) -> None:
        """The next calls are one pass through every layer, `rows` rows each (`Exchange.announce`)."""
        self.exchange.announce([(self.index, layer, rows) for layer in range(self.spec.num_layers)])

    @property
    def passes(self) -> bool:
        """Whether a whole decode pass can run as one graph on each side (`Exchange.begin_pass`)."""
        return self.exchange.passes

    def begin_pass(self, rows: int, lane: int = 0) -> None:
        self.exchange.begin_pass(self.index, rows, lane)

    def pass_calls(self, rehearse: bool = False, lane: int = 0) -> AbstractContextManager[None]:
        return self.exchange.pass_calls(rehearse, lane)


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
            for graphs in pool.graphs.values():     # before the teardown (`leave_world`)
                graphs.release()
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
                    if world.device.type == "cuda":
                        # now, not under the first requests (the in-process engine does it in capture_graphs)
                        side.tune_kernels()
                    if len(msg) > 2 and msg[2].cuda_graphs:
                        # the KV ranks replay attention sub-step graphs and send decode steps padded to a
                        # bucket: those FFN calls replay graphs here (captured after tuning)
                        graphs = pool.add_graphs(name, msg[2].max_num_seqs)
                        if exchange.passes and world.device.type == "cuda":
                            # the one KV rank's passes, in every lane it may use (lanes: with the pipeline on)
                            lanes = exchange.lanes if msg[2].pipeline else 1
                            graphs.capture_passes(0, lanes, exchange.out_dtype)
            except Exception:
                error = f"rank {world.rank} (weights): {traceback.format_exc()}"
            gather_to_front(error, world)
        elif kind == "remove":
            pool.remove(msg[1])
        elif kind == "step":
            exchange.serve_round(pool, names)
            gather_to_front(None, world)
