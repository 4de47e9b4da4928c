"""Layer-wise pipeline scheduler (CPU): interleaving never changes what a request generates.

Outputs with the pipeline on equal those with it off (greedy and seeded sampling; two and three models of
different families and layer counts; one model split into micro-batches); the sub-steps really alternate
attention(A, l) / FFN(B, l); a batch that finishes early leaves and the next joins before the other is
done; models are chosen by deadline slack and none starves (measured in engine steps, so deterministic);
the timeline comes out as JSON and PNG.
"""

from __future__ import annotations

import itertools
import json
import os
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():   # the sub-step graph test runs the Triton kernels in the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

from crosspool import LLM, EngineConfig, SamplingParams  # noqa: E402
from crosspool.bench import timeline  # noqa: E402
from crosspool.engine.engine import Engine  # noqa: E402
from crosspool.engine.pipeline import PipelineScheduler, Span, TimelineLog, ffn_order  # noqa: E402
from crosspool.models.make_model import make_model  # noqa: E402

TinyModels = Callable[[str], Path]
Workload = tuple[list[list[int]], list[SamplingParams], list[str]]   # prompts, params, model of each
VOCAB_TEXT = 509   # tiny presets: ids below this are plain byte-level tokens
OLMOE, QWEN3_2L, DSV2 = "olmoe", "qwen3-2l", "dsv2"   # 3 layers MHA, 2 layers GQA + qk-norm, 3 layers MLA


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads; on a shared 2-core box their barriers cost seconds."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def paths(tiny_models: TinyModels, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    qwen3 = make_model("tiny-qwen3-moe", tmp_path_factory.mktemp("pipeline") / "qwen3-2l", layers=2, seed=1,
                       progress=False)
    return {OLMOE: tiny_models("tiny-olmoe"), QWEN3_2L: qwen3, DSV2: tiny_models("tiny-deepseek-v2")}


def _prompts(lengths: list[int], seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB_TEXT, (n,), generator=g).tolist() for n in lengths]


def _params(i: int, max_tokens: int) -> SamplingParams:
    if i % 2:
        return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return SamplingParams(max_tokens=max_tokens, temperature=0.9, top_p=0.95, seed=100 + i, ignore_eos=True)


def _workload(models: list[str], per_model: int, seed: int) -> Workload:
    """Requests of every model with different prompt and output lengths, so they finish at different steps;
    later models ask for more tokens, so the first ones leave while the others run on."""
    n = len(models) * per_model
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 40, (n,), generator=g).tolist()
    outs = torch.randint(2, 10, (n,), generator=g).tolist()
    params = [_params(i, outs[i] + 5 * (i % len(models))) for i in range(n)]
    return _prompts(lengths, seed), params, [models[i % len(models)] for i in range(n)]


def _generate(paths: dict[str, Path], names: list[str], workload: Workload, record: bool = False,
              **config: object) -> tuple[list[list[int]], list[str], TimelineLog | None]:
    cfg = EngineConfig(block_size=8, num_kv_blocks=64, max_num_batched_tokens=48, **config)
    prompts, params, models = workload
    log = None
    with LLM({n: paths[n] for n in names}, cfg) as llm:
        if record:
            with timeline.record_timeline(llm.engine) as log:
                outs = llm.generate(prompts, params, model=models)
        else:
            outs = llm.generate(prompts, params, model=models)
    assert all(len(o.token_ids) == p.max_tokens for o, p in zip(outs, params, strict=True))
    return [o.token_ids for o in outs], [o.text for o in outs], log


def _by_batch(spans: list[Span]) -> dict[tuple[int, int], list[Span]]:
    out: dict[tuple[int, int], list[Span]] = defaultdict(list)
    for s in spans:
        out[s.step, s.batch].append(s)
    return out


def _check_alternation(log: TimelineLog) -> None:
    """Every batch runs attention(0), FFN(0), ..., head, one sub-step per tick; a tick holds at most one
    sub-step per side; some ticks hold one of each (two batches overlapping)."""
    for (_, _), subs in _by_batch(log.spans).items():
        kinds = [(s.kind, s.layer) for s in subs]
        layers = len(subs) // 2
        assert kinds == [k for layer in range(layers) for k in (("attention", layer), ("ffn", layer))] + [
            ("head", layers)]
        assert [s.tick for s in subs] == sorted({s.tick for s in subs})
    per_tick: dict[tuple[int, int], list[Span]] = defaultdict(list)
    for s in log.spans:
        per_tick[s.step, s.tick].append(s)
    assert all(sorted(s.side for s in subs) in (["attention"], ["ffn"], ["attention", "ffn"])
               for subs in per_tick.values())
    assert sum(len(subs) == 2 for subs in per_tick.values()) > len(per_tick) // 3


def _joins_after_early_exit(log: TimelineLog) -> int:
    """Batches that took a lane freed by a batch that left, while another batch was still mid-pass."""
    count = 0
    for step in {s.step for s in log.spans}:
        batches = [subs for (st, _), subs in _by_batch(log.spans).items() if st == step]
        first = {id(b): b[0].tick for b in batches}
        head = {id(b): b[-1].tick for b in batches}
        for z in batches:
            if any(head[id(y)] < first[id(z)] < head[id(x)] for x in batches for y in batches if x is not y):
                count += 1
    return count


# ------------------------------------------------------------------------------------------------
# outputs identical, pipeline on and off


@pytest.mark.parametrize("names, max_batches", [
    ([OLMOE, QWEN3_2L], None),
    ([OLMOE, QWEN3_2L, DSV2], None),
    ([DSV2, QWEN3_2L, OLMOE], 2),
])
def test_pipeline_outputs_equal_unpipelined(paths: dict[str, Path], names: list[str], max_batches: int | None) -> None:
    work = _workload(names, per_model=4, seed=len(names))
    ref_ids, ref_text, _ = _generate(paths, names, work)
    # micro-batches on (the default across pool ranks): every step enters the pipeline, lone models too
    ids, text, log = _generate(paths, names, work, record=True, pipeline=True, pipeline_max_batches=max_batches,
                               pipeline_micro_batches=True)
    assert ids == ref_ids
    assert text == ref_text
    assert log is not None
    _check_alternation(log)
    # requests finish mid-run: the models running change from step to step, and batches with fewer layers leave
    # early so the next batch joins while the other is mid-pass
    assert len({frozenset(s.batches) for s in log.steps}) > 1
    assert all(len(s.batches) <= (max_batches or len(names)) for s in log.steps)
    if len(names) == 3 and max_batches is None:
        assert _joins_after_early_exit(log) > 0


def test_single_model_runs_as_two_micro_batches(paths: dict[str, Path]) -> None:
    work = _workload([DSV2], per_model=5, seed=7)
    ref_ids, _, _ = _generate(paths, [DSV2], work)
    ids, _, log = _generate(paths, [DSV2], work, record=True, pipeline=True, pipeline_micro_batches=True)
    assert ids == ref_ids
    assert log is not None
    assert any(s.batches == [DSV2, DSV2] for s in log.steps)
    _check_alternation(log)


def test_on_one_device_a_lone_model_runs_its_plain_step(paths: dict[str, Path]) -> None:
    """Default on one device: no micro-batches; a step with one model ready runs unpipelined (nothing recorded
    for it), a step with two ready pairs them, and the outputs equal the unpipelined engine's."""
    names = [OLMOE, QWEN3_2L]
    work = _workload(names, per_model=3, seed=5)
    ref_ids, _, _ = _generate(paths, names, work)
    solo = _workload([DSV2], per_model=4, seed=7)
    ids, _, log = _generate(paths, names, work, record=True, pipeline=True)
    assert ids == ref_ids
    assert log is not None and log.steps
    assert all(len(s.batches) == 2 and len(set(s.batches)) == 2 for s in log.steps)   # pairs only
    solo_ref, _, _ = _generate(paths, [DSV2], solo)
    solo_ids, _, solo_log = _generate(paths, [DSV2], solo, record=True, pipeline=True)
    assert solo_ids == solo_ref
    assert solo_log is not None and not solo_log.steps       # one model alone never enters the pipeline


@pytest.mark.parametrize("names", [[OLMOE, QWEN3_2L], [DSV2]])
def test_sub_step_graphs_give_the_same_outputs(paths: dict[str, Path], names: list[str], monkeypatch) -> None:  # noqa: ANN001
    """The pipeline over the sub-step graphs' static buffers (Triton kernels; on CPU the interpreter, the
    graphs replayed eagerly): two models, or one model's two micro-batches in the two slots. Graphs come in two
    context classes (contexts up to 32 keys, and longer: `graphs.SHORT_CONTEXT`), both replayed here."""
    pytest.importorskip("triton")
    from crosspool.engine import graphs, substeps

    monkeypatch.setattr(graphs, "SHORT_CONTEXT", 32)
    classes: set[int] = set()
    monkeypatch.setattr(substeps, "context_class", lambda *a: classes.add(c := graphs.context_class(*a)) or c)
    work = _workload(names, per_model=3 if len(names) > 1 else 4, seed=11)
    ref_ids, ref_text, _ = _generate(paths, names, work)
    cfg = {"pipeline": True, "kernels": "triton", "cuda_graphs": True, "pipeline_micro_batches": True}
    ids, text, log = _generate(paths, names, work, record=True, **cfg)
    assert len(classes) == 2 and min(classes) == 32, classes
    assert ids == ref_ids
    assert text == ref_text
    assert log is not None
    _check_alternation(log)
    llm_slots = {s.batch for s in log.spans}
    assert llm_slots >= {0, 1}


@pytest.mark.parametrize("kv_ranks,weights_ranks", [(1, 2), (2, 1)])
def test_pipeline_across_pool_ranks_gives_the_same_outputs(paths: dict[str, Path], kv_ranks: int,
                                                           weights_ranks: int) -> None:
    """KV and weights pools in separate processes (gloo): the FFN sub-step sends, the other batch's attention
    runs, the output comes back later; with two KV ranks each runs its own pipeline over one world."""
    names = [OLMOE, QWEN3_2L]
    work = _workload(names, per_model=3, seed=5)
    ref_ids, ref_text, _ = _generate(paths, names, work)
    layout = {"kv_devices": ("cpu",) * kv_ranks if kv_ranks > 1 else (), "weights_ranks": weights_ranks}
    ids, text, _ = _generate(paths, names, work, pipeline=True, **layout)
    assert ids == ref_ids
    assert text == ref_text


# ------------------------------------------------------------------------------------------------
# the order itself


def test_sub_steps_alternate_and_a_new_batch_joins_on_early_exit(paths: dict[str, Path]) -> None:
    # targets rank the batches: olmoe (3 layers) leads, qwen3 (2 layers) follows, dsv2 waits for a lane
    targets = {OLMOE: 0.01, QWEN3_2L: 0.02, DSV2: 0.03}
    config = EngineConfig(pipeline=True, num_kv_blocks=8, tbt_targets_s=targets)
    llm = LLM({n: paths[n] for n in (DSV2, QWEN3_2L, OLMOE)}, config)
    for i, name in enumerate((DSV2, QWEN3_2L, OLMOE)):
        llm.engine.add_request(name, _prompts([5], i)[0], SamplingParams(max_tokens=1, temperature=0.0))
    with timeline.record_timeline(llm.engine) as log:
        llm.engine.step()
    order = [(s.tick, s.kind, s.model, s.layer) for s in log.spans]
    a, b, c = OLMOE, QWEN3_2L, DSV2
    assert order == [
        (0, "attention", a, 0),
        (1, "ffn", a, 0), (1, "attention", b, 0),     # attention(B, 0) issued while FFN(A, 0) runs
        (2, "ffn", b, 0), (2, "attention", a, 1),
        (3, "ffn", a, 1), (3, "attention", b, 1),
        (4, "ffn", b, 1), (4, "attention", a, 2),
        (5, "ffn", a, 2), (5, "head", b, 2),          # B has fewer layers: it leaves
        (6, "attention", c, 0),                       # C takes its lane before A's pass is over
        (7, "ffn", c, 0), (7, "head", a, 3),
        (8, "attention", c, 1), (9, "ffn", c, 1), (10, "attention", c, 2), (11, "ffn", c, 2), (12, "head", c, 3),
    ]
    assert log.steps[0].batches == [a, b, c]
    # what the pipeline announces to weights ranks: the same FFN order, worked out before any sub-step runs
    index = {a: 0, b: 1, c: 2}
    assert ffn_order([3, 2, 3], lanes=2) == [(index[s.model], s.layer) for s in log.spans if s.kind == "ffn"]


@pytest.mark.parametrize("lanes", [1, 2, 3])
def test_announced_ffn_order_is_the_issued_order(paths: dict[str, Path], lanes: int) -> None:
    """`ffn_order` against the order `_issue` really makes the FFN calls in, for the 2- and 3-layer models in
    every order (TBT targets rank them) and one to three lanes; with three lanes, qwen3 (2 layers) first, two
    batches want the attention slot while one of them is at its head, where the rule "the one with an FFN to
    follow goes first" decides. A wrong announcement would pair the weights ranks' messages with the wrong
    calls."""
    names = [OLMOE, QWEN3_2L, DSV2]
    layers = {OLMOE: 3, QWEN3_2L: 2, DSV2: 3}
    for order in itertools.permutations(names):
        targets = {m: 0.01 * (k + 1) for k, m in enumerate(order)}
        llm = LLM({n: paths[n] for n in names}, EngineConfig(pipeline=True, num_kv_blocks=32, tbt_targets_s=targets))
        llm.engine.pipeline.lanes = lanes
        for i, name in enumerate(names * 2):     # two requests a model: one batch of two
            llm.engine.add_request(name, _prompts([4 + i], i)[0], SamplingParams(max_tokens=1, temperature=0.0))
        with timeline.record_timeline(llm.engine) as log:
            llm.engine.step()
        llm.engine.close()
        assert log.steps[0].batches == list(order)
        issued = [(s.batch, s.layer) for s in log.spans if s.kind == "ffn"]
        assert ffn_order([layers[m] for m in order], lanes) == issued, order


def test_rank_is_earliest_deadline_first() -> None:
    now = [0.0]
    p = PipelineScheduler("cpu", tbt_target_s=4.0, tbt_targets_s={"cold": 1.0}, clock=lambda: now[0])
    assert p.rank(["busy", "cold"]) == ["cold", "busy"]      # both ready now: the tighter target first
    p._last["cold"] = 3.0                                    # cold just ran; busy has been ready since 0
    now[0] = 3.5
    assert p.rank(["cold", "busy"]) == ["busy", "cold"]      # equal deadlines: the longer wait first
    assert p.deadline("busy") == p.deadline("cold") == 4.0
    p._last["cold"] = 2.5
    assert p.rank(["busy", "cold"]) == ["cold", "busy"]      # 3.5 < 4.0
    assert p.rank(["cold"]) == ["cold"] and "busy" not in p._last   # idle models are forgotten


# ------------------------------------------------------------------------------------------------
# starvation, measured in engine steps


def _token_steps(engine: Engine, arrivals: dict[int, list[tuple[str, list[int], SamplingParams]]],
                 ) -> dict[str, list[list[int]]]:
    """Run engine steps with the pipeline's clock counting them until every request is done; requests in
    `arrivals[k]` are added before step k. Returns, per model, for each request its arrival step followed by
    the steps it got tokens at."""
    now = 0
    assert engine.pipeline is not None
    engine.pipeline.clock = lambda: float(now)
    got: dict[str, list[int]] = defaultdict(list)
    model_of: dict[str, str] = {}
    for now in range(200):
        if now > max(arrivals) and not engine.has_unfinished():
            break
        for model, prompt, params in arrivals.get(now, []):
            rid = engine.add_request(model, prompt, params)
            model_of[rid] = model
            got[rid].append(now)
        for out in engine.step():
            got[out.request_id].append(now)
    per_model: dict[str, list[list[int]]] = defaultdict(list)
    for rid, ticks in got.items():
        per_model[model_of[rid]].append(ticks)
    return per_model


def _max_gap(token_steps: list[list[int]]) -> int:
    return max(b - a for ticks in token_steps for a, b in zip(ticks, ticks[1:], strict=False))


@pytest.mark.parametrize("busy_target, cold_target", [(3, 1), (1, 3)])
def test_busy_models_cannot_starve_a_cold_one(paths: dict[str, Path], busy_target: int, cold_target: int) -> None:
    # two busy models with many requests and one cold model, two batches a step: someone waits every step.
    # The clock counts engine steps, so the targets read as steps.
    busy, cold = (OLMOE, DSV2), QWEN3_2L
    targets = {busy[0]: busy_target, busy[1]: busy_target, cold: cold_target}
    config = EngineConfig(pipeline=True, pipeline_max_batches=2, tbt_targets_s=targets, num_kv_blocks=64,
                          block_size=8)
    long = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    arrivals = {0: [(m, p, long) for m in busy for p in _prompts([6, 9, 4], 1)],
                3: [(cold, _prompts([7], 2)[0], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))]}
    got = _token_steps(LLM({n: paths[n] for n in (*busy, cold)}, config).engine, arrivals)
    assert len(got[cold][0]) == 1 + 12
    # no model waits longer than its target plus one step, for its first token or between two tokens
    # (the bound: floor((3 models - 1) / 2 batches a step) = 1)
    for model, target in targets.items():
        assert _max_gap(got[model]) <= target + 1, (model, got[model])
    if cold_target == 1:
        assert _max_gap(got[cold]) == 1            # the cold model runs every step...
        assert _max_gap(got[busy[0]]) > 1          # ...and the busy ones give way, within their targets


# ------------------------------------------------------------------------------------------------
# timeline


def test_timeline_json_and_png(paths: dict[str, Path], tmp_path: Path) -> None:
    config = EngineConfig(pipeline=True, num_kv_blocks=32, block_size=8)
    out_json, out_png = tmp_path / "timeline.json", tmp_path / "timeline.png"
    llm = LLM({n: paths[n] for n in (OLMOE, QWEN3_2L)}, config)
    prompts, params, models = _workload([OLMOE, QWEN3_2L], per_model=2, seed=3)
    with timeline.record_timeline(llm.engine, out_json, png=out_png):
        llm.generate(prompts, params, model=models)
    assert llm.engine.pipeline is not None and llm.engine.pipeline.timeline is None    # recording stopped
    data = json.loads(out_json.read_text())
    assert data["device"] == "cpu" and data["steps"] and data["spans"]
    assert {s["side"] for s in data["spans"]} == {"attention", "ffn"}
    for s in data["spans"]:
        step = data["steps"][s["step"]]
        assert step["start_ms"] <= s["start_ms"] <= s["end_ms"] <= step["end_ms"]
    summary = data["summary"]
    assert summary["steps"] == len(data["steps"])
    assert 0 < summary["attention_busy_ms"] + summary["ffn_busy_ms"] <= summary["serial_ms"] + 1e-6
    assert summary["overlapped_bound_ms"] <= summary["serial_ms"]
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    redrawn = tmp_path / "redrawn.png"
    timeline.main(["--in", str(out_json), "--out", str(redrawn)])
    assert redrawn.stat().st_size > 1000


def test_summary_counts_overlap() -> None:
    spans = [Span(0, 0, "attention", "attention", "a", 0, 0, 0.0, 2.0), Span(0, 0, "ffn", "ffn", "b", 1, 0, 1.0, 4.0)]
    data = {"device": "cuda:0", "steps": [{"step": 0, "start_ms": 0.0, "end_ms": 4.0, "batches": ["a", "b"]}],
            "spans": [{f: getattr(s, f) for f in Span.__slots__} for s in spans]}
    s = timeline.summarize(data)
    assert (s["attention_busy_ms"], s["ffn_busy_ms"], s["overlap_ms"]) == (2.0, 3.0, 1.0)
    assert (s["serial_ms"], s["overlapped_bound_ms"], s["wall_ms"]) == (5.0, 3.0, 4.0)


def test_config_validates_pipeline_knobs() -> None:
    with pytest.raises(ValueError, match="pipeline_max_batches"):
        EngineConfig(pipeline=True, pipeline_max_batches=0)
    with pytest.raises(ValueError, match="TBT targets"):
        EngineConfig(pipeline=True, tbt_targets_s={"m": 0.0})
    with pytest.raises(ValueError, match="TBT targets"):
        EngineConfig(tbt_target_s=-1.0)


def test_pipelined_async_decode_gives_the_same_outputs(paths: dict[str, Path]) -> None:
    """On one device (no micro-batches) greedy decode batches launch through the pipeline: their tokens stay on
    the device, feed the next pipelined step, and are read one step later; the outputs equal the unpipelined
    engine's, and a lone model switching to its whole-step graph reads its pipelined step first."""
    pytest.importorskip("triton")
    names = [OLMOE, QWEN3_2L]
    work = _workload(names, per_model=3, seed=11)
    ref_ids, ref_text, _ = _generate(paths, names, work)
    launched: list[bool] = []
    run = PipelineScheduler.run

    def counting(self, batches):  # noqa: ANN001, ANN202
        results = run(self, batches)
        launched.extend(r.launched is not None for r in results)
        return results

    PipelineScheduler.run = counting
    try:
        ids, text, _ = _generate(paths, names, work, pipeline=True, kernels="triton", cuda_graphs=True)
    finally:
        PipelineScheduler.run = run
    assert ids == ref_ids
    assert text == ref_text
    assert any(launched) and not all(launched)     # launched decode batches, synchronous prefill batches


def test_pipeline_across_pool_ranks_over_graphs_with_launches(paths: dict[str, Path], monkeypatch) -> None:  # noqa: ANN001
    """Across pool ranks with the sub-step graphs (interpreter on CPU): paired batches launch (async decode
    through the pipeline), a lone batch runs as two synchronous micro-batches; outputs equal the single-process
    unpipelined engine's. Whole-pass graphs off: with them one KV rank pipelines in lanes instead
    (`tests/test_transport.py`); the sub-step pipeline is what several KV ranks, or passes turned off, run."""
    pytest.importorskip("triton")
    monkeypatch.setenv("CROSSPOOL_PASS_GRAPHS", "0")      # the spawned ranks inherit it
    names = [OLMOE, QWEN3_2L]
    work = _workload(names, per_model=3, seed=5)
    ref_ids, ref_text, _ = _generate(paths, names, work)
    launched: list[bool] = []
    split: list[bool] = []
    run = PipelineScheduler.run

    def counting(self, batches):  # noqa: ANN001, ANN202
        results = run(self, batches)
        launched.extend(r.launched is not None for r in results)
        split.append(len(batches) == 1 and self.split_single and len(batches[0].scheduled) > 1
                     and batches[0].src_rows is None)
        return results

    PipelineScheduler.run = counting
    try:
        ids, text, _ = _generate(paths, names, work, pipeline=True, kernels="triton", cuda_graphs=True,
                                 weights_ranks=1)
    finally:
        PipelineScheduler.run = run
    assert ids == ref_ids
    assert text == ref_text
    assert any(launched) and any(split)       # paired batches launched; a lone batch ran as micro-batches
