"""Engine: several models served at once over the two pools.

Each model has its own scheduler, block manager (blocks come from the one shared KV pool) and runner;
its FFN runs in the weights pool. Models are loaded split: attention side here, FFN side into the pools'
layout (`crosspool.pools.layout`).

`step()` reads as: for each model with work, schedule -> run -> postprocess (append tokens, detokenize,
stop). With `EngineConfig.pipeline` the models' batches are scheduled first (earliest deadline first, up
to `pipeline_max_batches`) and run together by the `PipelineScheduler`, attention and FFN interleaved; across
pool ranks with whole-pass graphs, the models' passes go into lanes that run at once instead (`self.lanes`).

Requests are validated at `add_request` so a request that can never run fails at once, clearly.
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer

from crosspool.config import EngineConfig
from crosspool.engine.block_manager import BlockManager, blocks_for
from crosspool.engine.graphs import DecodeGraphs, LaunchedStep
from crosspool.engine.output import RequestOutput, update_text
from crosspool.engine.pipeline import PipelineBatch, PipelineScheduler
from crosspool.engine.runner import ModelRunner
from crosspool.engine.sampler import TokenLogprob
from crosspool.engine.sampling import SamplingParams
from crosspool.engine.scheduler import ScheduledSeq, Scheduler
from crosspool.engine.sequence import Sequence
from crosspool.engine.substeps import SubStepGraphs
from crosspool.models.attention_side import AttentionSide
from crosspool.models.ffn_side import FFNSide
from crosspool.models.loader import load_attention_weights, load_spec
from crosspool.models.model import MoEModel
from crosspool.pools.kv_pool import KVMaintainer
from crosspool.pools.layout import PoolLayout
from crosspool.pools.transport import Exchange


class RequestError(ValueError):
    """A request that cannot be served as asked (unknown model, too long, bad ids)."""


@dataclass
class ServedModel:
    name: str
    path: str
    model: MoEModel
    tokenizer: object
    eos_ids: set[int]
    max_model_len: int
    blocks: BlockManager | None = None
    scheduler: Scheduler | None = None
    runner: ModelRunner | None = None
    draining: bool = False             # being removed: admits no new requests
    launched: LaunchedStep | None = None   # async decode: a step on the device whose tokens are not read yet
    token_wait_s: float = 0.0          # host time spent blocked on launched steps' tokens (the rest of a step's
                                       # wall time is host work: bench decode's host_busy_ms)


class Engine:
    def __init__(self, models: dict[str, str | os.PathLike[str]], config: EngineConfig | None = None,
                 exchange: Exchange | None = None) -> None:
        """`exchange`: this process is a KV rank of a distributed world and FFNs run on weights ranks."""
        if not models:
            raise ValueError("no models given")
        self.config = config or EngineConfig()
        self.device = torch.device(self.config.device)
        self.layout = PoolLayout(self.config, exchange)
        self.models: dict[str, ServedModel] = {}
        for name, path in models.items():
            self.models[name] = self._load(name, Path(path))
        self.kv_pool = self.layout.build_kv_pool()
        background = self.config.kv_background_maintenance
        if background is None:
            background = self.device.type == "cuda"
        self.kv_maintainer = KVMaintainer(self.kv_pool) if background else None
        for m in self.models.values():
            self._attach_kv(m)
        self._ids = itertools.count()
        self._seqs: dict[str, Sequence] = {}
        # across pool ranks the FFN sub-step sends the hidden states and the batch's next attention sub-step
        # reads the output: the pipeline runs another batch's attention while the weights ranks compute
        micro = self.config.pipeline_micro_batches
        micro = exchange is not None if micro is None else micro
        self.pipeline = PipelineScheduler.from_config(self.config, micro) if self.config.pipeline else None
        # across ranks with whole-pass graphs the pipeline is lanes: the models of a step launch their passes
        # in turn into two lanes (two streams and communicators a side), which run at once on the devices, so
        # one model's attention fills the KV GPU while another's FFN runs on the weights GPU, layer by layer
        self.lanes = 1
        if self.pipeline is not None and exchange is not None and exchange.passes:
            self.pipeline, self.lanes = None, exchange.lanes

    def _load(self, name: str, path: Path) -> ServedModel:
        spec = load_spec(path)
        attention = AttentionSide(spec, load_attention_weights(path, spec, self.config.dtype, self.device),
                                  self.config.kernels)
        model = MoEModel(spec, attention, self.layout.load_ffn(name, path, spec))
        tok = AutoTokenizer.from_pretrained(path)
        eos = set(spec.eos_token_ids)
        if tok.eos_token_id is not None:
            eos.add(tok.eos_token_id)
        limit = spec.max_position_embeddings
        max_len = min(self.config.max_model_len or limit, limit)
        return ServedModel(name, str(path), model, tok, eos, max_len)

    def _attach_kv(self, m: ServedModel) -> None:
        cfg = self.config
        kv = self.kv_pool.register(m.name, m.model.spec, cfg.block_size, cfg.dtype)
        caps = [c for c in (cfg.num_kv_blocks,
                            (cfg.kv_caps_bytes or {}).get(m.name, 0) // kv.block_bytes or None) if c]
        m.blocks = BlockManager(kv, min(caps) if caps else None)
        m.scheduler = Scheduler(cfg, m.blocks)
        graphs = substeps = None
        if cfg.cuda_graphs:
            args = (m.model, kv, self.device, cfg.max_num_seqs, m.max_model_len, self.device.type == "cuda")
            # one graph per decode step: in process, or across pool ranks with the FFN's NCCL traffic inside
            passes = getattr(m.model.ffn, "passes", False)
            whole = isinstance(m.model.ffn, FFNSide) or passes
            if whole:
                # across ranks with the pipeline on, a graph of each pass per lane (see __init__)
                lanes = m.model.ffn.exchange.lanes if passes and cfg.pipeline else 1
                graphs = DecodeGraphs(*args, lanes=lanes)
            if (cfg.pipeline and not passes) or not whole:
                # the pipeline's units: one graph per sub-step (across ranks with whole passes the pipeline is
                # lanes, see __init__); across several KV ranks also the plain step's (the FFN runs on the
                # weights ranks between the attention graphs)
                substeps = SubStepGraphs(*args)
        m.runner = ModelRunner(m.model, kv, self.device, graphs, substeps)

    # ---- models at runtime ----------------------------------------------------------------------
    def prepare_model(self, name: str, path: str | os.PathLike[str]) -> ServedModel:
        """Load a model into the pools (weights, attention side, KV range) without serving it yet.
        Safe to call from another thread while the engine steps; `attach_model` then serves it."""
        if self.layout.exchange is not None:
            raise NotImplementedError("adding models at runtime is not supported with pool ranks yet")
        if name in self.models:
            raise ValueError(f"a model named {name!r} is already served")
        served = self._load(name, Path(path))
        try:
            self._attach_kv(served)
        except Exception:
            self.layout.weights.remove(name)
            raise
        return served

    def attach_model(self, served: ServedModel) -> None:
        """Start serving a prepared model (engine thread; quick)."""
        if served.name in self.models:
            raise ValueError(f"a model named {served.name!r} is already served")
        self.models[served.name] = served

    def drain_model(self, name: str) -> None:
        """Stop admitting requests for `name`; its running and queued requests continue."""
        self._served(name).draining = True

    def abort_model(self, name: str) -> list[str]:
        """Abort every request of `name`; returns their ids."""
        ids = [rid for rid, seq in self._seqs.items() if seq.model == name]
        for rid in ids:
            self.abort(rid)
        return ids

    def remove_model(self, name: str) -> None:
        """Stop serving `name` and free its weights and KV range. It must have no requests left."""
        served = self._served(name)
        if served.scheduler.has_work():
            raise RuntimeError(f"{name} still has requests; drain or abort them first")
        self._read_launched(served)       # a launched step of finished requests: nothing left to report
        del self.models[name]
        self.kv_pool.unregister(name)
        if self.layout.weights is not None:
            self.layout.weights.remove(name)

    def capture_graphs(self) -> dict[str, float]:
        """Tune every model's fused-MoE kernels and capture its CUDA graphs now (a server does this at startup,
        so no request waits on tuning or a capture); seconds per model. Models without graphs take 0."""
        seconds = {}
        for name, m in self.models.items():
            t = time.perf_counter()
            if self.device.type == "cuda" and isinstance(m.model.ffn, FFNSide):
                m.model.ffn.tune_kernels()
            for graphs in (m.runner.graphs, m.runner.substeps):
                if graphs is not None and graphs.capture:
                    graphs.capture_all()
            seconds[name] = time.perf_counter() - t
        return seconds

    def close(self) -> None:
        """Stop the KV maintainer, drop the CUDA graphs (across ranks they hold NCCL resources that the world's
        teardown waits for) and release every KV page."""
        for m in self.models.values():
            for graphs in (m.runner.graphs, m.runner.substeps):
                if graphs is not None:
                    graphs.release()
        if self.kv_maintainer is not None:
            self.kv_maintainer.close()
        self.kv_pool.close()

    # ---- requests ------------------------------------------------------------------------------
    def add_request(self, model: str, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        params = params or SamplingParams()
        served = self._served(model)
        text, ids = self.tokenize(model, prompt)
        self._validate(served, ids, params)
        if request_id is None:
            rid = f"req-{next(self._ids)}"
            while rid in self._seqs:          # skip ids a caller chose for its own requests
                rid = f"req-{next(self._ids)}"
        elif request_id in self._seqs:
            raise RequestError(f"duplicate request id {request_id!r}")
        else:
            rid = request_id
        seq = Sequence(rid, model, text, ids, params)
        if params.seed is not None:
            seq.generator = torch.Generator(device=self.device).manual_seed(params.seed)
        self._seqs[rid] = seq
        served.scheduler.add(seq)
        return rid

    def _served(self, model: str) -> ServedModel:
        served = self.models.get(model)
        if served is None:
            raise RequestError(f"unknown model {model!r}; serving {sorted(self.models)}")
        return served

    def tokenize(self, model: str, prompt: str | list[int]) -> tuple[str, list[int]]:
        """(text, token ids) of a prompt given as text or as ids."""
        if isinstance(prompt, str):
            return prompt, list(self._served(model).tokenizer(prompt).input_ids)
        return "", [int(i) for i in prompt]

    def validate_request(self, model: str, ids: list[int], params: SamplingParams) -> None:
        """Raise RequestError if the request could never run here (what add_request checks first)."""
        self._validate(self._served(model), ids, params)

    def has_request(self, request_id: str) -> bool:
        return request_id in self._seqs

    def _validate(self, served: ServedModel, ids: list[int], params: SamplingParams) -> None:
        cfg = self.config
        if served.draining:
            raise RequestError(f"model {served.name!r} is being removed and admits no new requests")
        if not ids:
            raise RequestError("prompt is empty")
        vocab = served.model.spec.vocab_size
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise RequestError(f"prompt token ids out of range [0, {vocab}): {bad[:5]}")
        total = len(ids) + params.max_tokens
        if total > served.max_model_len:
            raise RequestError(
                f"{served.name}: maximum context length is {served.max_model_len} tokens, but the request "
                f"asks for {total} ({len(ids)} prompt + {params.max_tokens} max_tokens)"
            )
        need = blocks_for(total, cfg.block_size)
        if need > served.blocks.num_blocks:
            raise RequestError(
                f"{served.name}: request needs {need} KV blocks ({total} tokens), the KV cache has "
                f"{served.blocks.num_blocks}"
            )
        if not cfg.enable_chunked_prefill and total > cfg.max_num_batched_tokens:
            raise RequestError(
                f"{served.name}: {total} tokens exceed max_num_batched_tokens={cfg.max_num_batched_tokens} "
                "with chunked prefill off"
            )

    def abort(self, request_id: str) -> None:
        seq = self._seqs.pop(request_id, None)
        if seq is None or seq.finished:
            return
        self.models[seq.model].scheduler.finish(seq)
        seq.finish_reason = "abort"

    def has_unfinished(self) -> bool:
        return any(m.scheduler.has_work() or m.launched is not None for m in self.models.values())

    # ---- the loop ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []

        def postprocess(served: ServedModel, scheduled: list[ScheduledSeq],
                        sampled: dict[int, tuple[int, TokenLogprob | None]], now: float) -> None:
            for i, s in enumerate(scheduled):
                s.seq.num_computed += s.num_new_tokens
                if i in sampled:
                    outputs.append(self._append(served, s.seq, *sampled[i], now))

        def schedule_async(served: ServedModel, pipelined: bool, may_launch: bool = True
                           ) -> tuple[list[ScheduledSeq], bool]:
            """The model's next batch, and whether it launches (async decode: its greedy tokens stay on the
            device and feed the next step; the step in flight is read after this one is queued). A batch that
            does not launch waits for the step in flight to be read first: it may finish some of its sequences."""
            nonlocal outputs
            if self.config.async_decode and may_launch and not served.scheduler.waiting:
                scheduled = served.scheduler.schedule()
                if scheduled and served.runner.can_launch(scheduled, served.launched, pipelined):
                    return scheduled, True
                outputs += self._read_launched(served)
                return [s for s in scheduled if not s.seq.finished], False
            outputs += self._read_launched(served)
            return (served.scheduler.schedule() if served.scheduler.has_work() else []), False

        def step_alone(served: ServedModel, lane: int = 0) -> bool:
            """One model's step on its own: a whole-step graph, launched asynchronously when it can be (across
            ranks in `lane`). Whether it launched."""
            nonlocal outputs
            scheduled, launch = schedule_async(served, pipelined=False)
            if launch:
                outputs += self._launch(served, scheduled, lane)
            elif scheduled:
                postprocess(served, scheduled, served.runner.step(scheduled), time.perf_counter())
            return launch

        if self.pipeline is None:
            lane = 0
            for served in self.models.values():
                if (served.launched is not None or served.scheduler.has_work()) and step_alone(served, lane):
                    lane = (lane + 1) % self.lanes
        else:
            ready = self.pipeline.rank([n for n, m in self.models.items() if m.scheduler.has_work()])
            for name, served in self.models.items():     # models without work: read what is in flight
                if name not in ready:
                    outputs += self._read_launched(served)
            if len(ready) == 1 and not self.pipeline.split_single:
                # nothing to pair with (and no micro-batches on one device): the pipeline would only add
                # launches, so the lone model runs its plain step
                step_alone(self.models[ready[0]])
                ready = []
            batches: list[PipelineBatch] = []
            # a lone batch the pipeline cuts into micro-batches (two slots) does not launch; batches of
            # several models each take slot 0 of their model and launch (a launched batch is never cut)
            micro = len(ready) == 1 and self.pipeline.split_single
            for name in ready:
                if len(batches) == self.pipeline.max_batches:
                    break
                served = self.models[name]
                scheduled, launch = schedule_async(served, pipelined=True, may_launch=not micro)
                if scheduled:
                    src = served.runner.src_rows(scheduled, served.launched) if launch else None
                    batches.append(PipelineBatch(name, served.runner, scheduled, src))
            for batch, result in zip(batches, self.pipeline.run(batches), strict=True):
                served = self.models[batch.model]
                if result.launched is not None:
                    outputs += self._launched(served, batch.scheduled, result.launched)
                else:
                    postprocess(served, batch.scheduled, result.sampled, result.done_s)
        self._maintain_kv()
        return outputs

    def _launch(self, served: ServedModel, scheduled: list[ScheduledSeq], lane: int = 0) -> list[RequestOutput]:
        """Async decode: queue this step (its inputs may be the previous step's tokens, read on the device),
        then read the previous step's tokens while the device runs this one. Stop conditions are therefore
        seen one step late: a sequence that stopped there has one wasted row here, which is dropped."""
        launched = served.runner.launch(scheduled, served.launched, lane=lane)
        return self._launched(served, scheduled, launched)

    def _launched(self, served: ServedModel, scheduled: list[ScheduledSeq], launched: LaunchedStep
                  ) -> list[RequestOutput]:
        """`launched` (this step, queued) replaces the step in flight, whose tokens are read now."""
        for s in scheduled:
            s.seq.num_computed += 1
            s.seq.pending += 1
        outputs = self._read_launched(served)
        served.launched = launched
        return outputs

    def _read_launched(self, served: ServedModel) -> list[RequestOutput]:
        """Wait for the launched step's tokens and hand them to their sequences (those still running)."""
        launched, served.launched = served.launched, None
        if launched is None:
            return []
        wait_start = time.perf_counter()
        tokens = launched.wait()
        now = time.perf_counter()
        served.token_wait_s += now - wait_start
        outputs = []
        for s, token in zip(launched.scheduled, tokens, strict=True):
            if s.seq.finished:          # stopped on an earlier token, or aborted
                continue
            s.seq.pending -= 1
            outputs.append(self._append(served, s.seq, token, None, now))
        return outputs

    def _maintain_kv(self) -> None:
        demand = {name: m.scheduler.next_step_blocks() for name, m in self.models.items() if m.scheduler.has_work()}
        if self.kv_maintainer is not None:
            self.kv_maintainer.request(demand)
        else:
            self.kv_pool.maintain(demand)

    def _append(self, served: ServedModel, seq: Sequence, token: int, logprob: TokenLogprob | None,
                now: float) -> RequestOutput:
        seq.output_token_ids.append(token)
        if logprob is not None:
            seq.logprobs.append(logprob)
        seq.metrics.add_token(now)
        new_text = update_text(seq, served.tokenizer, served.eos_ids, served.max_model_len)
        if seq.finish_reason is not None:
            served.scheduler.finish(seq)
            seq.metrics.finished_s = now
            self._seqs.pop(seq.request_id, None)
        return RequestOutput.of(seq, new_text)
