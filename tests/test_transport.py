"""The FFN protocol between KV ranks and weights ranks (`pools.transport.Exchange`), over gloo processes."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

if not torch.cuda.is_available():   # the graph-path test runs the Triton kernels in the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

from crosspool import LLM, SamplingParams  # noqa: E402
from crosspool.config import EngineConfig, layout_settings  # noqa: E402
from crosspool.engine.scheduler import ScheduledSeq  # noqa: E402
from crosspool.engine.sequence import Sequence  # noqa: E402
from crosspool.pools.transport import Exchange  # noqa: E402
from crosspool.pools.world import (  # noqa: E402
    RankError,
    World,
    broadcast_control,
    free_port,
    gather_to_front,
    init_world,
)

HIDDEN = [8, 12]          # two models with different hidden sizes


class _ShardPool:
    """A weights rank's partial FFN: x * (layer + 1) * (shard + 1), so the partials sum to
    x * (layer + 1) * M(M+1)/2, and a call that reached the wrong model, layer or rank shows."""

    def __init__(self, shard: int) -> None:
        self.shard = shard

    def ffn(self, name: str, layer: int, x: torch.Tensor) -> torch.Tensor:
        return x * (layer + 1) * (self.shard + 1) + (0 if name == "a" else 1000 * (self.shard + 1))


def _calls(rank: int) -> list[tuple[int, int, int]]:
    """(model, layer, tokens) of each KV rank's calls: different counts, sizes and models per rank."""
    return [(rank % 2, layer, 3 + rank) for layer in range(4)] + [((rank + 1) % 2, 0, 1)] * (rank + 1)


def _rank(rank: int, kv_ranks: int, weights_ranks: int, port: int, out: dict) -> None:
    world = World(kv_ranks, weights_ranks, rank, torch.device("cpu"))
    init_world(world, f"tcp://127.0.0.1:{port}")
    exchange = Exchange(world, torch.float32)
    exchange.hidden_sizes += HIDDEN
    scale = weights_ranks * (weights_ranks + 1) // 2
    for _ in range(2):                                   # two rounds: the protocol resets between them
        if world.is_kv:
            before = exchange.messages_sent
            calls = _calls(rank)
            xs = [torch.randn(t, HIDDEN[m]) for m, _, t in calls]
            # started in pairs and read in reverse, as the pipeline overlaps two batches
            got: dict[int, torch.Tensor] = {}
            for i in range(0, len(calls), 2):
                pair = range(i, min(i + 2, len(calls)))
                pend = [(j, exchange.ffn_start(calls[j][0], calls[j][1], xs[j])) for j in pair]
                for j, p in reversed(pend):
                    got[j] = p.result()
            exchange.finish_round()
            for j, (m, layer, _) in enumerate(calls):
                want = xs[j] * (layer + 1) * scale + (0 if m == 0 else 1000 * scale)
                assert torch.allclose(got[j], want), (rank, j)
            out[rank] = exchange.messages_sent - before
        else:
            exchange.serve_round(_ShardPool(world.shard.rank), ["a", "b"])
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("kv_ranks,weights_ranks", [(1, 1), (2, 2)])
def test_exchange_serves_overlapping_calls_from_every_kv_rank(kv_ranks: int, weights_ranks: int) -> None:
    # a spawned manager: forking the test process (large by now, in a full run) can fail with ENOMEM
    with mp.get_context("spawn").Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank, args=(kv_ranks, weights_ranks, free_port(), out), nprocs=kv_ranks + weights_ranks)
        sent = dict(out)
    # per call: a header and the hidden states to each weights rank; per round: a "done" header to each
    assert sent == {k: (2 * len(_calls(k)) + 1) * weights_ranks for k in range(kv_ranks)}


def _prefill(llm: LLM, name: str, ids: list[int]) -> torch.Tensor:
    served = llm.engine.models[name]
    seq = Sequence("probe", name, "", ids, SamplingParams())
    served.blocks.grow(seq, len(ids))
    try:
        run = lambda: served.runner.logits_for([ScheduledSeq(seq, len(ids))])
        distributed = getattr(llm.engine, "run_in_round", None)
        return distributed(run) if distributed else run()
    finally:
        served.blocks.release(seq)


def test_one_kv_rank_one_weights_rank_match_single_process_with_one_message_a_layer(tiny_models) -> None:  # noqa: ANN001
    path = tiny_models("tiny-olmoe")
    prompts = [[5, 17, 3, 99, 42, 7], [8, 1, 2]]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    single = LLM({"m": path}, EngineConfig(block_size=4))
    ref = single.generate(prompts, params, model="m")
    ref_logits = _prefill(single, "m", prompts[0])
    single.engine.close()

    llm = LLM({"m": path}, EngineConfig(block_size=4, **layout_settings(kv_ranks=1, weights_ranks=1)))
    try:
        out = llm.generate(prompts, params, model="m")
        exchange = llm.engine.exchange
        before, plans = exchange.messages_sent, exchange.plans_sent
        logits = _prefill(llm, "m", prompts[0])
        layers = llm.engine.models["m"].model.spec.num_layers
        # the pass is announced (a header and its plan), then only the hidden states go a layer; one "done"
        assert exchange.messages_sent - before == layers + 3
        assert exchange.plans_sent - plans == 1
    finally:
        llm.engine.close()
    # the ranks run with fewer threads (other matmul blocking): equal up to rounding
    assert (logits - ref_logits).abs().max().item() <= 1e-5 * ref_logits.abs().max().item()
    assert [o.token_ids for o in out] == [o.token_ids for o in ref]


@pytest.mark.parametrize("passes", [False, True])
@pytest.mark.parametrize("weights_ranks", [1, 2])
def test_graph_path_across_ranks_gives_the_single_process_tokens(tiny_models, monkeypatch, weights_ranks: int,  # noqa: ANN001
                                                                 passes: bool) -> None:
    """`cuda_graphs` across pool ranks. Whole passes (one KV rank): the KV rank runs each decode step as one
    `DecodeGraphs` step whose FFN calls carry no header, after one OP_PASS header; the weights ranks serve the
    pass's layers in order (on a GPU both sides replay one graph with the NCCL traffic inside). Without them: the
    attention sub-step graphs (`SubStepGraphs` with a remote FFN) and bucket-padded rows that the weights ranks
    serve from `FFNGraphs`. On CPU everything runs eagerly over the same static buffers (Triton in the
    interpreter)."""
    pytest.importorskip("triton")
    monkeypatch.setenv("CROSSPOOL_PASS_GRAPHS", "1" if passes else "0")    # the spawned ranks inherit it
    path = tiny_models("tiny-olmoe")
    prompts = [[5, 17, 3, 99, 42, 7], [8, 1, 2], [4, 4, 9, 10]]      # 3 decode rows: bucket 3, then 2, 1
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (9, 6, 4)]
    cfg = {"block_size": 4, "kernels": "triton", "cuda_graphs": True, "max_num_seqs": 4}
    with LLM({"m": path}, EngineConfig(**cfg)) as single:
        ref = [o.token_ids for o in single.generate(prompts, params, model="m")]
    llm = LLM({"m": path}, EngineConfig(**cfg, **layout_settings(kv_ranks=1, weights_ranks=weights_ranks)))
    try:
        runner = llm.engine.models["m"].runner
        exchange = llm.engine.exchange
        used = []
        if passes:
            assert runner.substeps is None and runner.graphs is not None and runner.graphs.remote
            assert runner.graphs.lanes == 1          # the pipeline is off: every pass in lane 0
            queue = runner.graphs._queue       # under both `run` and `launch`
            runner.graphs._queue = lambda scheduled, *rest: (used.append(len(scheduled)), queue(scheduled, *rest))[1]
        else:
            assert runner.graphs is None and runner.substeps is not None and runner.substeps.remote
            stages = runner.substeps.stages
            runner.substeps.stages = lambda slot, scheduled, *rest, **kw: (used.append(len(scheduled)),
                                                                           stages(slot, scheduled, *rest, **kw))[1]
        launched = []
        launch = runner.launch
        runner.launch = lambda scheduled, previous, **kw: (launched.append(previous is not None),
                                                           launch(scheduled, previous, **kw))[1]
        passes_before = exchange.passes_sent
        out = [o.token_ids for o in llm.generate(prompts, params, model="m")]
        # one OP_PASS header per decode step exactly when whole passes are on
        assert (exchange.passes_sent - passes_before == len(used)) if passes else exchange.passes_sent == 0
    finally:
        llm.engine.close()
    assert out == ref
    assert used and set(used) >= {1, 3}        # decode steps of 3 rows down to 1 went through the graph path
    assert any(launched)                       # async decode: steps launched on the previous step's tokens


def test_rehearsed_pass_sends_nothing_and_whole_passes_need_one_kv_rank() -> None:
    """The run before a pass graph's capture (kernels compile) must not reach the weights ranks, which expect
    no such pass: its FFN calls send nothing and read zeros. With two KV ranks whole passes are refused."""
    exchange = Exchange(World(1, 1, 0, torch.device("cpu")), torch.float32)
    assert exchange.passes or os.environ.get("CROSSPOOL_PASS_GRAPHS") == "0"
    with exchange.pass_calls(rehearse=True):
        out = exchange.ffn(0, 3, torch.ones(2, 8))
    assert exchange.messages_sent == 0 and torch.equal(out, torch.zeros(2, 8)) and not exchange._in_flight
    two = Exchange(World(2, 1, 0, torch.device("cpu")), torch.float32)
    assert not two.passes
    with pytest.raises(RankError, match="one KV rank"):
        two.begin_pass(0, 4)


def test_lanes_across_ranks_give_the_single_process_tokens(tiny_models) -> None:  # noqa: ANN001
    """The pipeline across ranks with whole passes: the models of a step launch their passes into two lanes (a
    communicator each; on a GPU also a stream and graph each side). Three models, so lanes alternate and a model
    changes lanes from step to step; a seeded sampled request (steps that do not launch: the graph runs in lane 0
    and the host waits for it) goes beside them. Tokens equal the single process's."""
    pytest.importorskip("triton")
    models = {"a": tiny_models("tiny-olmoe"), "b": tiny_models("tiny-qwen3-moe"), "c": tiny_models("tiny-olmoe")}
    prompts = [[5, 17, 3, 99, 42, 7], [8, 1, 2], [4, 4, 9, 10], [30, 31, 32]]
    names = ["a", "b", "c", "c"]
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (7, 5, 6)]
    params.append(SamplingParams(max_tokens=5, temperature=0.9, seed=11, ignore_eos=True))
    cfg = {"block_size": 4, "kernels": "triton", "cuda_graphs": True, "max_num_seqs": 4}
    with LLM(models, EngineConfig(**cfg)) as single:
        ref = [o.token_ids for o in single.generate(prompts, params, model=names)]
    llm = LLM(models, EngineConfig(**cfg, pipeline=True, **layout_settings(kv_ranks=1, weights_ranks=1)))
    try:
        engine = llm.engine.local
        assert engine.lanes == 2 and engine.pipeline is None
        assert all(m.runner.substeps is None for m in engine.models.values())     # no unused sub-step graphs
        assert all(m.runner.graphs.lanes == 2 for m in engine.models.values())
        exchange = llm.engine.exchange
        lanes: dict[int, list[int]] = {}
        begin = exchange.begin_pass
        exchange.begin_pass = lambda model, rows, lane=0: (lanes.setdefault(model, []).append(lane),
                                                           begin(model, rows, lane))[1]
        out = [o.token_ids for o in llm.generate(prompts, params, model=names)]
    finally:
        llm.engine.close()
    assert out == ref
    assert {lane for seen in lanes.values() for lane in seen} == {0, 1}      # both lanes carried passes
    assert any(len(set(seen)) == 2 for seen in lanes.values())               # a model moved between lanes


def _control_rank(rank: int, port: int, out: dict) -> None:
    world = World(2, 1, rank, torch.device("cpu"))
    init_world(world, f"tcp://127.0.0.1:{port}")
    got = []
    for msg in [("step", {}), ("step", {1: [("abort", "r7")]}), ("load", [("m", "/x")], {"a": 1}), ("step", {})]:
        got.append(broadcast_control(msg if rank == 0 else None, world))
        # rank 1 reports a list, rank 2 nothing, then the other way round
        mine = {1: ["out", rank]}.get(rank) if len(got) % 2 else {2: {"e": rank}}.get(rank)
        gathered = gather_to_front(mine if rank else "front", world)
        if rank == 0:
            got.append(gathered)
        else:
            assert gathered is None
    out[rank] = got
    dist.destroy_process_group()


def test_control_messages_and_gathers_reach_every_rank_intact() -> None:
    """The per-step control path (`broadcast_control`: two ints for a step without commands, else a pickled
    message; `gather_to_front`: sizes in one gather, payloads only from ranks with something to say)."""
    with mp.get_context("spawn").Manager() as manager:
        out = manager.dict()
        mp.spawn(_control_rank, args=(free_port(), out), nprocs=3)
        got = dict(out)
    sent = [("step", {}), ("step", {1: [("abort", "r7")]}), ("load", [("m", "/x")], {"a": 1}), ("step", {})]
    assert got[1] == got[2] == sent
    assert got[0][1::2] == [["front", ["out", 1], None], ["front", None, {"e": 2}]] * 2


def test_a_step_failing_mid_pass_is_reported_and_the_world_stays_in_step(tiny_models) -> None:  # noqa: ANN001
    """Rank 0's step raises after its pass was announced (the weights rank has queued every layer and waits
    for hidden states): the round still ends for every rank, the error reaches the caller, and the next
    requests run to the single-process tokens (no rank left waiting for the 10-minute timeout)."""
    path = tiny_models("tiny-olmoe")
    prompts = [[5, 17, 3, 99, 42, 7], [8, 1, 2]]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    with LLM({"m": path}, EngineConfig(block_size=4)) as single:
        ref = [o.token_ids for o in single.generate(prompts, params, model="m")]
    llm = LLM({"m": path}, EngineConfig(block_size=4, **layout_settings(kv_ranks=1, weights_ranks=1)))
    try:
        attention = llm.engine.local.models["m"].model.attention
        block = attention.attention_block
        fail = {"left": 1}

        def failing(layer: int, *a, **kw):  # noqa: ANN002, ANN003, ANN202
            if layer == 1 and fail["left"]:
                fail["left"] -= 1
                raise RuntimeError("injected failure in layer 1")
            return block(layer, *a, **kw)

        attention.attention_block = failing
        exchange = llm.engine.exchange
        plans = exchange.plans_sent
        with pytest.raises(RuntimeError, match="injected failure"):
            llm.generate(prompts, params, model="m")
        assert exchange.plans_sent > plans and not exchange._announced and not exchange._in_flight
        assert not llm.engine.has_unfinished()          # `generate` aborted its requests
        out = [o.token_ids for o in llm.generate(prompts, params, model="m")]
    finally:
        llm.engine.close()
    assert out == ref
