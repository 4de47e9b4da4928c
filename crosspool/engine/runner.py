"""Model runner: turns a scheduled step into a ForwardBatch, runs the model, samples next tokens.

`step` is the three pieces back to back: `prepare` (the batch), the model's sub-steps (`stages`), and
`sample_tokens` (logits + next tokens). The pipeline scheduler calls the pieces itself to interleave batches.
With `graphs` (CUDA graphs of the decode step, `crosspool.engine.graphs`), a step whose sequences each add
one token replays a captured graph instead.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from crosspool.engine.graphs import DecodeGraphs, LaunchedStep
from crosspool.engine.sampler import TokenLogprob, sample
from crosspool.engine.scheduler import ScheduledSeq
from crosspool.engine.substeps import SubStepGraphs
from crosspool.models.batch import ForwardBatch, PagedCache
from crosspool.models.model import MoEModel, Stages, run_stages

Sampled = dict[int, tuple[int, TokenLogprob | None]]   # {index in scheduled: (token, logprobs)}


def build_batch(scheduled: list[ScheduledSeq], block_size: int, device: torch.device) -> ForwardBatch:
    ids: list[int] = []
    positions: list[int] = []
    seq_index: list[int] = []
    slots: list[int] = []
    logits_index: list[int] = []
    max_blocks = max(len(s.seq.block_table) for s in scheduled)
    tables = torch.zeros(len(scheduled), max_blocks, dtype=torch.long)
    context_lens: list[int] = []
    for b, s in enumerate(scheduled):
        seq, start = s.seq, s.seq.num_computed
        end = start + s.num_new_tokens
        table = seq.block_table
        # pad with the sequence's own first block: kernels never touch a block that may be remapped
        tables[b] = table[0]
        tables[b, : len(table)] = torch.tensor(table, dtype=torch.long)
        for pos in range(start, end):
            ids.append(seq.token_at(pos))
            positions.append(pos)
            seq_index.append(b)
            slots.append(table[pos // block_size] * block_size + pos % block_size)
        if s.completes:
            logits_index.append(len(ids) - 1)
        context_lens.append(end)

    def t(x: list[int]) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.long, device=device)

    starts = [0]
    for s in scheduled:
        starts.append(starts[-1] + s.num_new_tokens)
    return ForwardBatch(t(ids), t(positions), t(seq_index), t(slots), tables.to(device), t(context_lens),
                        t(logits_index), torch.tensor(starts, dtype=torch.int32, device=device),
                        max(s.num_new_tokens for s in scheduled), max(context_lens))


def _one_token_each(scheduled: list[ScheduledSeq]) -> bool:
    """A decode step: every sequence adds one token (what the graphs are captured for)."""
    return all(s.num_new_tokens == 1 for s in scheduled)


class ModelRunner:
    def __init__(self, model: MoEModel, cache: PagedCache, device: torch.device,
                 graphs: DecodeGraphs | None = None, substeps: SubStepGraphs | None = None) -> None:
        self.model = model
        self.cache = cache
        self.device = device
        self.graphs = graphs
        self.substeps = substeps
        # benchmarks: a list to receive (start, end) CUDA events around each step's device work
        self.gpu_spans: list[tuple[torch.cuda.Event, torch.cuda.Event]] | None = None

    def step(self, scheduled: list[ScheduledSeq]) -> dict[int, tuple[int, TokenLogprob | None]]:
        """Run one step; returns {index in `scheduled`: (sampled token, its logprobs)} for sequences
        that complete."""
        start = self._mark()
        if self.graphs is not None and self._graph_step(scheduled):
            logits = self.graphs.run(scheduled)
        elif self.graphs is None and self._launchable(scheduled):
            # across pool ranks: the attention sub-steps as graphs, the FFN on the weights ranks in between
            logits = run_stages(self.substeps.stages(0, scheduled, announce=True))
        else:
            batch = self.prepare(scheduled)
            logits = self._logits(batch, self.model.forward(batch, self.cache))
        if start is not None:
            self.gpu_spans.append((start, self._mark()))
        return self._sample(scheduled, logits)

    def _mark(self) -> torch.cuda.Event | None:
        if self.gpu_spans is None or self.device.type != "cuda":
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _graph_step(self, scheduled: list[ScheduledSeq]) -> bool:
        return len(scheduled) <= self.graphs.max_batch and _one_token_each(scheduled)

    def can_launch(self, scheduled: list[ScheduledSeq], previous: LaunchedStep | None = None,
                   pipelined: bool = False) -> bool:
        """Whether the step can run asynchronously: a graph replay of one-token decodes, every sequence greedy
        with nothing but the token to report (no logprobs, no penalties), so tokens can stay on the device; and
        a step still in flight (`previous`) left its tokens where this step's graphs read them. `pipelined`:
        as a pipeline batch (the sub-step graphs of slot 0) rather than a plain step."""
        ok = self._sub_step_decode(scheduled) if pipelined else self._launchable(scheduled)
        return (ok and (previous is None or previous.source is self._tokens_buffer(pipelined))
                and all(s.seq.params.greedy and not s.seq.params.penalized and s.seq.params.logprobs is None
                        for s in scheduled))

    def _tokens_buffer(self, pipelined: bool) -> torch.Tensor:
        if pipelined or self.graphs is None:
            return self.substeps.slots[0].inputs.tokens
        return self.graphs.inputs.tokens

    @staticmethod
    def src_rows(scheduled: list[ScheduledSeq], previous: LaunchedStep | None) -> list[int]:
        """Per sequence, the row of `previous` whose token it takes on the device (-1: its ids come from the
        host): the sequences whose last token the host has not read yet (`seq.pending`)."""
        rows = {id(s.seq): r for r, s in enumerate(previous.scheduled)} if previous is not None else {}
        return [rows[id(s.seq)] if s.seq.pending else -1 for s in scheduled]

    def _sub_step_decode(self, scheduled: list[ScheduledSeq]) -> bool:
        """A decode step the sub-step graphs hold."""
        return self.substeps is not None and self.substeps.fits(len(scheduled)) and _one_token_each(scheduled)

    def _launchable(self, scheduled: list[ScheduledSeq]) -> bool:
        if self.graphs is not None:
            return self._graph_step(scheduled)
        # across pool ranks: the sub-step graphs (attention here, FFN on the weights ranks) launch the same way
        return self._sub_step_decode(scheduled)

    def launch(self, scheduled: list[ScheduledSeq], previous: LaunchedStep | None, lane: int = 0) -> LaunchedStep:
        """Queue the step (see `can_launch`) without waiting for it. A sequence whose token the previous
        launched step sampled and the host has not read (`seq.pending`) gets it on the device. `lane`: across
        pool ranks, the lane its whole pass runs in (`DecodeGraphs`)."""
        src = self.src_rows(scheduled, previous)
        start = self._mark()
        if self.graphs is not None:
            launched = self.graphs.launch(scheduled, src, lane)
        else:
            launched = self.substeps.launch(scheduled, src)
        if start is not None:
            self.gpu_spans.append((start, self._mark()))
        return launched

    def pipeline_stages(self, scheduled: list[ScheduledSeq], slot: int, src_rows: list[int] | None = None
                        ) -> tuple[Stages, Callable[[torch.Tensor], Sampled | LaunchedStep]]:
        """The step as sub-steps for the pipeline scheduler, and what turns the sub-steps' final value into
        sampled tokens. Decode-only steps replay the sub-step graphs of `slot` (0 or 1: the two batches of
        this model a pipelined step may hold); others run eagerly. `src_rows` (a launched batch, see
        `can_launch(..., pipelined=True)`): the greedy tokens stay on the device and come back as a LaunchedStep
        whose copy to the host is queued, not waited for."""
        if self._sub_step_decode(scheduled):
            stages = self.substeps.stages(slot, scheduled, src_rows)
            if src_rows is not None:
                tokens = self.substeps.slots[slot].inputs.tokens
                return stages, lambda logits: self.substeps.readback.queue(scheduled, tokens)
            return stages, lambda logits: self._sample(scheduled, logits)
        batch = self.prepare(scheduled)
        return self.stages(batch), lambda hidden: self.sample_tokens(scheduled, batch, hidden)

    def prepare(self, scheduled: list[ScheduledSeq]) -> ForwardBatch:
        return build_batch(scheduled, self.cache.block_size, self.device)

    def stages(self, batch: ForwardBatch) -> Stages:
        """The model's forward as sub-steps (see `MoEModel.forward_stages`)."""
        return self.model.forward_stages(batch, self.cache)

    def sample_tokens(self, scheduled: list[ScheduledSeq], batch: ForwardBatch,
                      hidden: torch.Tensor) -> dict[int, tuple[int, TokenLogprob | None]]:
        """Next tokens of the sequences that complete, from the final hidden states of the batch."""
        if batch.logits_index.numel() == 0:
            return {}
        return self._sample(scheduled, self._logits(batch, hidden))

    def _logits(self, batch: ForwardBatch, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of the rows whose next token is wanted."""
        return self.model.compute_logits(hidden[batch.logits_index])

    def _sample(self, scheduled: list[ScheduledSeq], logits: torch.Tensor
                ) -> dict[int, tuple[int, TokenLogprob | None]]:
        """logits: one row per completing sequence, or one per scheduled sequence."""
        completing = [i for i, s in enumerate(scheduled) if s.completes]
        if not completing:
            return {}
        if logits.shape[0] != len(completing):
            logits = logits[completing]
        seqs = [scheduled[i].seq for i in completing]
        tokens, logprobs = sample(logits, [s.params for s in seqs], [s.generator for s in seqs],
                                  [s.output_token_ids for s in seqs])
        return dict(zip(completing, zip(tokens, logprobs, strict=True), strict=True))

    def logits_for(self, scheduled: list[ScheduledSeq]) -> torch.Tensor:
        """Debug/parity path: run one step and return logits of EVERY scheduled token."""
        batch = self.prepare(scheduled)
        return self.model.compute_logits(self.model.forward(batch, self.cache))
