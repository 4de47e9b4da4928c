"""Layer-wise pipeline scheduler: the attention and FFN sub-steps of two batches, interleaved.

Owns: the order in which one engine step's batches (one per model) run their sub-steps, the choice of
which models run in a step (deadline slack), the two sides' CUDA streams and the events between them,
and the timeline spans it records on request. May touch: the runners it is handed (`prepare` ->
`stages` -> `sample_tokens`), nothing else. The engine schedules before and postprocesses after; the
schedulers, sequences and pools are not the pipeline's to change.

Order. Two lanes hold one batch each. A tick has one attention slot and one FFN slot. A batch's sub-steps
alternate sides — attention(0) (with the embedding), FFN(0), attention(1), ..., FFN(L-1), and the head
(final residual add, and with sub-step graphs the logits; attention side; tokens are sampled once the whole
step is queued) — so two batches half a layer apart keep both
sides busy: FFN(B, l) is issued, then attention(A, l), which runs meanwhile. A batch that is done (fewer
layers, or nothing left) leaves its lane, and the next batch takes it at the next tick while the other
lane carries on (early exit); when both want the attention slot, the one with an FFN to follow goes
first, so the FFN side is not left idle. A step with a single batch of several sequences is split into
two micro-batches (by sequence, balancing tokens) so the sides still alternate.

Deadlines. Each model has a TBT target; its deadline is when it last produced tokens (or became ready)
plus its target. `rank` orders models earliest deadline first (least slack, most overdue first; ties: the
one waiting longest), the engine schedules them in that order up to `max_batches`, and lanes are filled
in that order. No model starves: while a model waits its deadline stays fixed, and every model that runs
after that deadline moves its own deadline past it, so with n models and k batches a step it runs at
most floor((n - 1) / k) steps after its deadline (targets at least one step long).

Devices. On CUDA the sides run on two streams: a batch's sub-step waits on the event recorded after its
previous one on the other side, the hand-off tensor is recorded on the consuming stream (so the caching
allocator keeps it until read), and the default stream waits for both at the end. On CPU there are no
streams: the same order runs sequentially and every stream/event call is a no-op. Across pool ranks
(`pools.transport.Exchange`) the FFN sub-step of batch B sends its hidden states to the weights ranks and
returns; attention(A, l) then runs here while the weights ranks compute, and B's next attention sub-step
reads the output (`PendingFFN.result`).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from crosspool.config import EngineConfig
from crosspool.engine.graphs import LaunchedStep
from crosspool.engine.runner import ModelRunner, Sampled
from crosspool.engine.scheduler import ScheduledSeq
from crosspool.models.model import ATTENTION_SIDE, FFN_SIDE, Stages, SubStep

HEAD = "head"


@dataclass(slots=True)
class PipelineBatch:
    """One model's scheduled step, as the engine hands it over."""

    model: str
    runner: ModelRunner
    scheduled: list[ScheduledSeq]
    src_rows: list[int] | None = None   # set: launched (async decode, greedy tokens stay on the device)


@dataclass(slots=True)
class BatchResult:
    sampled: Sampled     # as ModelRunner.step returns it: {index in scheduled: (token, logprobs)}
    done_s: float        # perf_counter when its tokens were sampled
    launched: LaunchedStep | None = None   # a launched batch: its tokens, on their way to the host


@dataclass(slots=True)
class Span:
    """One sub-step as it ran; times in ms since the recording started."""

    step: int            # pipelined steps since the recording started
    tick: int
    side: str            # ATTENTION_SIDE | FFN_SIDE
    kind: str            # "attention" | "ffn" | "head"
    model: str
    batch: int           # the batch's index in its step (the two micro-batches of one model differ)
    layer: int
    start_ms: float
    end_ms: float


@dataclass(slots=True)
class StepMark:
    step: int
    start_ms: float
    end_ms: float
    batches: list[str]   # model of each batch (micro-batches listed separately)


@dataclass(slots=True)
class TimelineLog:
    device: str
    steps: list[StepMark] = field(default_factory=list)
    spans: list[Span] = field(default_factory=list)


class SideStreams:
    """The attention and FFN sides' CUDA streams and the events that order one batch's sub-steps across
    them. On CPU there are none: every method is a no-op and work runs in issue order."""

    def __init__(self, device: torch.device, attention_sms: int | None = None) -> None:
        """attention_sms: split the GPU's SMs between the sides with green contexts (`engine.green`), at
        least this many for the attention side; None: two ordinary streams sharing every SM."""
        self.cuda = device.type == "cuda"
        self.sms: tuple[int, int] | None = None
        if self.cuda and attention_sms:
            from crosspool.engine.green import green_streams

            green = green_streams(device, attention_sms)
            self._green = green
            self.sms = green.sms
            self._streams = {ATTENTION_SIDE: green.attention, FFN_SIDE: green.ffn}
        else:
            self._streams = {s: torch.cuda.Stream(device) for s in (ATTENTION_SIDE, FFN_SIDE)} if self.cuda else {}

    def begin(self) -> None:
        """Both sides wait for the work queued so far on the current stream (the batches' metadata)."""
        if self.cuda:
            current = torch.cuda.current_stream()
            for s in self._streams.values():
                s.wait_stream(current)

    def end(self) -> None:
        """The current stream waits for both sides."""
        if self.cuda:
            current = torch.cuda.current_stream()
            for s in self._streams.values():
                current.wait_stream(s)

    @contextmanager
    def on(self, side: str, after: torch.cuda.Event | None) -> Iterator[None]:
        """Run the body on `side`'s stream, after `after` (the batch's previous sub-step)."""
        if not self.cuda:
            yield
            return
        stream = self._streams[side]
        with torch.cuda.stream(stream):
            if after is not None:
                stream.wait_event(after)
            yield

    def hand_over(self, tensor: torch.Tensor, side: str) -> None:
        """`tensor` was made on the other side's stream and is read on `side`'s: its memory must not be
        reused before that read is done."""
        if self.cuda:
            tensor.record_stream(self._streams[side])

    def mark(self, side: str | None, timing: bool = False) -> torch.cuda.Event | None:
        """An event recorded on `side`'s stream (None: the current stream); None on CPU."""
        if not self.cuda:
            return None
        event = torch.cuda.Event(enable_timing=timing)
        event.record(self._streams[side] if side is not None else torch.cuda.current_stream())
        return event


@dataclass(slots=True, eq=False)
class _Flight:
    """A batch in the pipeline: its forward as a generator of sub-steps and where it stands."""

    index: int
    owner: int                     # index of the engine's batch it belongs to
    offset: int                    # index of its first sequence in the owner's scheduled list
    part: PipelineBatch
    finish: Callable[[torch.Tensor], Sampled | LaunchedStep]    # the stages' final value -> tokens
    stages: Stages
    next: SubStep
    num_layers: int
    rows: int                      # rows of each of its FFN calls
    ready: torch.cuda.Event | None = None    # after its latest sub-step (CUDA)
    final: torch.Tensor | None = None        # set by the head: the batch has left its lane
    sampled: Sampled | LaunchedStep | None = None   # once every sub-step of the step is issued
    done_s: float = 0.0

    @property
    def next_kind(self) -> str:
        if self.next.side == FFN_SIDE:
            return FFN_SIDE
        return HEAD if self.next.layer == self.num_layers else ATTENTION_SIDE


@dataclass(slots=True)
class _StepRecord:
    """A step being recorded: its origin stamp and one raw tuple per sub-step, resolved to ms at its end."""

    mark: StepMark
    origin: float | torch.cuda.Event | None
    subs: list[tuple] = field(default_factory=list)


def issue_order(layers: list[int], lanes: int) -> list[tuple[int, int, int]]:
    """(tick, batch, sub-step) in the order a step issues them, for batches of `layers` layers each (the order
    depends on nothing else). A batch's sub-steps are numbered attention(0) = 0, FFN(0) = 1, ...,
    FFN(L-1) = 2L-1, head = 2L (even: attention side). Each tick fills free lanes in order, then issues one FFN
    sub-step and one attention-side one (FFN first: attention(A, l) is issued while FFN(B, l) runs); when two
    batches want the attention slot, the one with an FFN to follow goes before the one at its head."""
    at = [0] * len(layers)
    waiting = deque(range(len(layers)))
    lane: list[int] = []
    order = []
    tick = 0
    while waiting or lane:
        while waiting and len(lane) < lanes:
            lane.append(waiting.popleft())
        ffn = next((i for i in lane if at[i] % 2 == 1), None)
        attention = min((i for i in lane if at[i] % 2 == 0), key=lambda i: at[i] == 2 * layers[i], default=None)
        for i in (ffn, attention):
            if i is not None:
                order.append((tick, i, at[i]))
                at[i] += 1
        lane = [i for i in lane if at[i] <= 2 * layers[i]]
        tick += 1
    return order


def ffn_order(layers: list[int], lanes: int) -> list[tuple[int, int]]:
    """(batch, layer) of each FFN sub-step, in `issue_order`."""
    return [(i, sub // 2) for _, i, sub in issue_order(layers, lanes) if sub % 2 == 1]


class PipelineScheduler:
    def __init__(self, device: torch.device | str, tbt_target_s: float = 0.1,
                 tbt_targets_s: dict[str, float] | None = None, max_batches: int | None = None,
                 lanes: int = 2, split_single: bool = True, clock: Callable[[], float] = time.perf_counter,
                 attention_sms: int | None = None) -> None:
        """lanes: batches in flight at once (1: one after another, for comparison). clock: the time base of
        deadlines (tests use an engine-step counter, so targets read as steps)."""
        if lanes < 1:
            raise ValueError(f"lanes must be >= 1, got {lanes}")
        self.device = torch.device(device)
        self.tbt_target_s = tbt_target_s
        self.tbt_targets_s = dict(tbt_targets_s or {})
        self.max_batches = max_batches
        self.lanes = lanes
        self.split_single = split_single
        self.clock = clock
        self.streams = SideStreams(self.device, attention_sms)
        self.timeline: TimelineLog | None = None
        self._last: dict[str, float] = {}     # model -> when it last produced tokens or became ready
        self._origin_s = 0.0

    @classmethod
    def from_config(cls, config: EngineConfig, split_single: bool = True) -> PipelineScheduler:
        return cls(config.device, config.tbt_target_s, config.tbt_targets_s, config.pipeline_max_batches,
                   split_single=split_single, attention_sms=config.pipeline_attention_sms)

    # ---- which models run, in which order --------------------------------------------------------
    def target_s(self, model: str) -> float:
        return self.tbt_targets_s.get(model, self.tbt_target_s)

    def deadline(self, model: str) -> float:
        return self._last[model] + self.target_s(model)

    def rank(self, models: Sequence[str]) -> list[str]:
        """The models with work, earliest deadline first. A model not seen with work before became ready
        now; one missing from `models` is idle and forgotten."""
        now = self.clock()
        self._last = {m: self._last.get(m, now) for m in models}
        return sorted(models, key=lambda m: (self.deadline(m), self._last[m]))

    # ---- one step ----------------------------------------------------------------------------------
    def run(self, batches: list[PipelineBatch]) -> list[BatchResult]:
        """Run every batch's forward and sampling, interleaved layer by layer; results in batch order."""
        if not batches:
            return []
        flights = []
        for i, (owner, offset, part) in enumerate(self._split(batches)):
            slot = sum(f.part.model == part.model for f in flights)   # the model's batches so far this step
            flights.append(self._flight(i, owner, offset, part, slot))
        self._announce(flights)
        record = self._begin_record(flights)     # its origin stamp first: the sides start after it
        self.streams.begin()
        try:
            self._issue(flights, record)
        finally:
            self.streams.end()
        # sampling syncs with the device: only once everything of the step is queued, so no sub-step waits
        # for the host to read another batch's tokens
        for f in flights:
            f.sampled = f.finish(f.final)
            f.done_s = time.perf_counter()
        self._end_record(record)
        return self._merge(batches, flights)

    def _issue(self, flights: list[_Flight], record: _StepRecord | None) -> None:
        """Every sub-step of the step, in `issue_order`."""
        for tick, i, _ in issue_order([f.num_layers for f in flights], self.lanes):
            self._sub_step(flights[i], tick, record)

    def _announce(self, flights: list[_Flight]) -> None:
        """Across pool ranks: tell the weights ranks every FFN call of the step, in the order `_issue` will
        make them (`ffn_order`), so they queue the step's calls at once instead of one header per call."""
        calls: dict[int, tuple[object, list[tuple[int, int, int]]]] = {}
        for i, layer in ffn_order([f.num_layers for f in flights], self.lanes):
            ffn = flights[i].part.runner.model.ffn
            if hasattr(ffn, "announce"):
                calls.setdefault(id(ffn.exchange), (ffn.exchange, []))[1].append((ffn.index, layer, flights[i].rows))
        for exchange, planned in calls.values():
            exchange.announce(planned)

    def _split(self, batches: list[PipelineBatch]) -> list[tuple[int, int, PipelineBatch]]:
        """(owner, offset, batch) to run; a lone batch of several sequences becomes two micro-batches,
        cut where the two token counts are closest."""
        whole = [(i, 0, b) for i, b in enumerate(batches)]
        if (len(batches) > 1 or self.lanes < 2 or not self.split_single or len(batches[0].scheduled) < 2
                or batches[0].src_rows is not None):
            return whole
        b = batches[0]
        tokens = [s.num_new_tokens for s in b.scheduled]
        total = sum(tokens)
        cut = min(range(1, len(tokens)), key=lambda c: abs(total - 2 * sum(tokens[:c])))
        return [(0, 0, PipelineBatch(b.model, b.runner, b.scheduled[:cut])),
                (0, cut, PipelineBatch(b.model, b.runner, b.scheduled[cut:]))]

    def _flight(self, index: int, owner: int, offset: int, part: PipelineBatch, slot: int) -> _Flight:
        stages, finish = part.runner.pipeline_stages(part.scheduled, slot, part.src_rows)
        first = next(stages)         # prepares the inputs, runs no sub-step: says attention(0) comes first
        return _Flight(index, owner, offset, part, finish, stages, first, part.runner.model.spec.num_layers,
                       first.rows)

    def _sub_step(self, f: _Flight, tick: int, record: _StepRecord | None) -> None:
        step, kind = f.next, f.next_kind
        with self.streams.on(step.side, f.ready):
            if step.handoff is not None:
                self.streams.hand_over(step.handoff, step.side)
            start = self._stamp(step.side) if record is not None else None
            try:
                f.next = next(f.stages)
            except StopIteration as done:      # the final residual add ran: the batch leaves its lane
                f.final = done.value
                self._last[f.part.model] = self.clock()
            f.ready = self.streams.mark(step.side)
            if record is not None:
                record.subs.append((tick, step.side, kind, f.part.model, f.index, step.layer, start,
                                    self._stamp(step.side)))

    def _merge(self, batches: list[PipelineBatch], flights: list[_Flight]) -> list[BatchResult]:
        results = [BatchResult({}, 0.0) for _ in batches]
        for f in flights:
            assert f.sampled is not None
            out = results[f.owner]
            if isinstance(f.sampled, LaunchedStep):     # a launched batch is never cut into micro-batches
                out.launched = f.sampled
            else:
                out.sampled.update({f.offset + i: v for i, v in f.sampled.items()})
            out.done_s = max(out.done_s, f.done_s)
        return results

    # ---- timeline ----------------------------------------------------------------------------------
    def start_recording(self) -> TimelineLog:
        """Record every sub-step of the following steps (CUDA events on GPU, perf_counter on CPU)."""
        self.timeline = TimelineLog(str(self.device))
        self._origin_s = time.perf_counter()
        return self.timeline

    def stop_recording(self) -> TimelineLog | None:
        log, self.timeline = self.timeline, None
        return log

    def _ms(self, seconds: float) -> float:
        return (seconds - self._origin_s) * 1e3

    def _stamp(self, side: str | None) -> float | torch.cuda.Event:
        return self.streams.mark(side, timing=True) if self.streams.cuda else time.perf_counter()

    def _begin_record(self, flights: list[_Flight]) -> _StepRecord | None:
        if self.timeline is None:
            return None
        mark = StepMark(len(self.timeline.steps), self._ms(time.perf_counter()), 0.0, [f.part.model for f in flights])
        self.timeline.steps.append(mark)
        return _StepRecord(mark, self._stamp(None))

    def _end_record(self, record: _StepRecord | None) -> None:
        if record is None or self.timeline is None:
            return
        mark = record.mark
        if self.streams.cuda:
            torch.cuda.synchronize(self.device)
            origin = record.origin

            def ms(stamp: float | torch.cuda.Event) -> float:
                return mark.start_ms + origin.elapsed_time(stamp)
        else:
            ms = self._ms
        spans = [Span(mark.step, tick, side, kind, model, index, layer, ms(start), ms(end))
                 for tick, side, kind, model, index, layer, start, end in record.subs]
        self.timeline.spans += spans
        mark.end_ms = max([s.end_ms for s in spans] + [self._ms(time.perf_counter())])
