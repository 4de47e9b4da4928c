"""Engine behaviour on tiny checkpoints (CPU, fp32): scheduling never changes what a request generates.

Preemption + recompute, chunked prefill, batch composition and model mixing must all give exactly the
tokens the request gets when it runs alone; bad requests fail at add_request with a clear RequestError
and leave the engine serving; every KV block comes back after every workload.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from crosspool import LLM, EngineConfig, RequestOutput, SamplingParams
from crosspool.engine.engine import Engine, RequestError
from crosspool.engine.scheduler import ScheduledSeq

TinyModels = Callable[[str], Path]
OLMOE = "tiny-olmoe"
FAMILIES = ("tiny-olmoe", "tiny-qwen2-moe", "tiny-deepseek-v2")
VOCAB_TEXT = 509  # tiny presets: ids 509..511 are special tokens, 0..508 plain byte-level tokens


def _prompts(lengths: list[int], seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB_TEXT, (n,), generator=g).tolist() for n in lengths]


def _greedy(max_tokens: int = 24) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def _sampled(seed: int, max_tokens: int = 24) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.8, seed=seed, ignore_eos=True)


def _assert_all_blocks_free(engine: Engine) -> None:
    assert not engine.has_unfinished()
    assert not engine._seqs
    for served in engine.models.values():
        assert served.blocks is not None and served.scheduler is not None
        assert served.blocks.num_free == served.blocks.num_blocks, served.name
        assert served.blocks.num_used == 0, served.name
        kv = served.blocks.kv
        assert kv.stats().used_blocks == 0, "blocks still counted as used in the KV pool"
        assert len(kv._free) == len(set(kv._free)), "a block id is duplicated in the free list"
        assert kv.mapped_bytes == 0, "an idle model still holds KV pages"
        assert not served.scheduler.running and not served.scheduler.waiting
    assert engine.kv_pool.free_pages == engine.kv_pool.total_pages, "KV pages lost"


def _generate(llm: LLM, prompts: list[list[int]], params: list[SamplingParams],
              models: list[str] | None = None) -> list[RequestOutput]:
    outs = llm.generate(prompts, params, model=models)
    _assert_all_blocks_free(llm.engine)
    for out, p in zip(outs, params, strict=True):
        assert out.finished
        assert len(out.token_ids) == p.max_tokens and out.finish_reason == "length"
    return outs


def _ids(outs: list[RequestOutput]) -> list[list[int]]:
    return [o.token_ids for o in outs]


def _record_steps(llm: LLM, model: str) -> list[list[tuple[int, int, int, bool]]]:
    """Wrap the model's runner to log every step as (prompt len, num_computed, num_new_tokens, completes)."""
    runner = llm.engine.models[model].runner
    assert runner is not None
    steps: list[list[tuple[int, int, int, bool]]] = []
    inner = runner.step

    def step(scheduled: list[ScheduledSeq]) -> dict[int, int]:
        steps.append([(len(s.seq.prompt_token_ids), s.seq.num_computed, s.num_new_tokens, s.completes)
                      for s in scheduled])
        return inner(scheduled)

    runner.step = step  # type: ignore[method-assign]
    return steps


# ------------------------------------------------------------------------------------------------
# preemption


LENGTHS = [5, 40, 12, 33, 7, 26, 19, 38]


def test_preemption_recompute_gives_identical_greedy_outputs(tiny_models: TinyModels) -> None:
    prompts = _prompts(LENGTHS, seed=0)
    params = [_greedy()] * len(prompts)
    big = LLM({OLMOE: tiny_models(OLMOE)}, num_kv_blocks=512, block_size=4)
    # 20 blocks = 80 tokens: the longest request alone needs 64, so the batch cannot fit
    small = LLM({OLMOE: tiny_models(OLMOE)}, num_kv_blocks=20, block_size=4)
    ref = _generate(big, prompts, params)
    out = _generate(small, prompts, params)
    assert sum(o.num_preemptions for o in ref) == 0
    assert sum(o.num_preemptions for o in out) > 0
    assert small.engine.models[OLMOE].scheduler.num_preemptions == sum(o.num_preemptions for o in out)
    assert _ids(out) == _ids(ref)
    assert [o.text for o in out] == [o.text for o in ref]


def test_preemption_keeps_seeded_sampling_identical(tiny_models: TinyModels) -> None:
    prompts = _prompts(LENGTHS, seed=1)
    params = [_sampled(seed=100 + i) for i in range(len(prompts))]
    big = LLM({OLMOE: tiny_models(OLMOE)}, num_kv_blocks=512, block_size=4)
    small = LLM({OLMOE: tiny_models(OLMOE)}, num_kv_blocks=20, block_size=4)
    ref = _generate(big, prompts, params)
    out = _generate(small, prompts, params)
    assert sum(o.num_preemptions for o in out) > 0
    assert _ids(out) == _ids(ref)
    # it is really sampling: the greedy tokens differ
    greedy = _generate(big, prompts, [_greedy()] * len(prompts))
    assert _ids(greedy) != _ids(ref)


def test_preempted_request_recomputes_prompt_and_outputs(tiny_models: TinyModels) -> None:
    """After a preemption the whole sequence (prompt + tokens generated so far) is prefilled again."""
    prompts = _prompts(LENGTHS, seed=2)
    small = LLM({OLMOE: tiny_models(OLMOE)}, num_kv_blocks=20, block_size=4)
    steps = _record_steps(small, OLMOE)
    _generate(small, prompts, [_greedy()] * len(prompts))
    recomputes = [n for step in steps for (plen, done, n, _) in step if done == 0 and n > plen]
    assert recomputes, "no preempted sequence was recomputed with its generated tokens"


# ------------------------------------------------------------------------------------------------
# chunked prefill


def test_chunked_prefill_gives_identical_outputs(tiny_models: TinyModels) -> None:
    prompts = _prompts([5, 40, 17, 9, 31, 8], seed=3)
    params = [_greedy(), _sampled(7), _greedy(), _sampled(8), _greedy(), _greedy()]
    chunked = LLM({OLMOE: tiny_models(OLMOE)}, num_kv_blocks=256, block_size=4, max_num_batched_tokens=8,
                  enable_chunked_prefill=True)
    whole = LLM({OLMOE: tiny_models(OLMOE)}, num_kv_blocks=256, block_size=4, max_num_batched_tokens=2048,
                enable_chunked_prefill=False)
    chunk_steps = _record_steps(chunked, OLMOE)
    whole_steps = _record_steps(whole, OLMOE)
    out = _generate(chunked, prompts, params)
    ref = _generate(whole, prompts, params)
    assert _ids(out) == _ids(ref)
    # prompts longer than the budget really were split, and no step went over the budget
    partial = [(plen, n) for step in chunk_steps for (plen, _, n, completes) in step if not completes]
    assert any(plen > 8 for plen, _ in partial)
    assert all(sum(n for (_, _, n, _) in step) <= 8 for step in chunk_steps)
    assert not any(not completes for step in whole_steps for (*_, completes) in step)


# ------------------------------------------------------------------------------------------------
# batch composition


def test_batch_of_one_equals_batch_of_ten(tiny_models: TinyModels) -> None:
    prompts = _prompts([5, 11, 40, 23, 8, 17, 30, 14, 36, 6], seed=4)
    params = [_greedy() if i % 2 == 0 else _sampled(seed=i) for i in range(10)]
    llm = LLM({OLMOE: tiny_models(OLMOE)}, num_kv_blocks=256, block_size=8)
    batch = _generate(llm, prompts, params)
    steps = _record_steps(llm, OLMOE)
    alone = [_generate(llm, [p], [sp])[0] for p, sp in zip(prompts, params, strict=True)]
    assert max(len(s) for s in steps) == 1  # really alone
    assert _ids(alone) == _ids(batch)
    assert [o.text for o in alone] == [o.text for o in batch]


def test_three_families_thirty_mixed_requests(tiny_models: TinyModels) -> None:
    names = {f: tiny_models(f) for f in FAMILIES}
    config = EngineConfig(num_kv_blocks=48, block_size=8, max_num_batched_tokens=64)
    llm = LLM(names, config)
    g = torch.Generator().manual_seed(5)
    lengths = torch.randint(5, 41, (30,), generator=g).tolist()
    prompts = _prompts(lengths, seed=5)
    models = [FAMILIES[(i * 7) % 3] for i in range(30)]
    params = [_greedy(16) if i % 3 else _sampled(seed=i, max_tokens=16) for i in range(30)]
    mixed = _generate(llm, prompts, params, models)
    assert [o.model for o in mixed] == models
    alone = [_generate(llm, [p], [sp], [m])[0] for p, sp, m in zip(prompts, params, models, strict=True)]
    assert _ids(mixed) == _ids(alone)
    # the three models really generate differently from the same prompt
    same_prompt = _generate(llm, [prompts[0]] * 3, [_greedy(16)] * 3, list(FAMILIES))
    assert len({tuple(o.token_ids) for o in same_prompt}) == 3


# ------------------------------------------------------------------------------------------------
# errors and abort


@pytest.fixture()
def engine(tiny_models: TinyModels) -> Engine:
    # 8 blocks of 4 tokens: 32 tokens of KV; context limit 40
    return Engine({OLMOE: tiny_models(OLMOE)}, EngineConfig(num_kv_blocks=8, block_size=4, max_model_len=40))


def _drain(engine: Engine) -> dict[str, RequestOutput]:
    done: dict[str, RequestOutput] = {}
    while engine.has_unfinished():
        for out in engine.step():
            assert out.request_id not in done
            if out.finished:
                done[out.request_id] = out
    _assert_all_blocks_free(engine)
    return done


@pytest.mark.parametrize(
    ("model", "prompt", "max_tokens", "message"),
    [
        ("nope", [1, 2, 3], 4, r"unknown model 'nope'"),
        (OLMOE, [], 4, r"prompt is empty"),
        (OLMOE, "", 4, r"prompt is empty"),
        (OLMOE, [1, 512, 3], 4, r"out of range \[0, 512\).*512"),
        (OLMOE, [5, -1], 4, r"out of range.*-1"),
        (OLMOE, [7] * 30, 20, r"maximum context length is 40 .* 50 \(30 prompt \+ 20 max_tokens\)"),
        (OLMOE, [7] * 20, 16, r"needs 9 KV blocks \(36 tokens\).* has 8"),
    ],
)
def test_bad_requests_raise_and_engine_keeps_serving(
    engine: Engine, model: str, prompt: list[int] | str, max_tokens: int, message: str,
) -> None:
    good = _prompts([6, 9], seed=6)
    first = engine.add_request(OLMOE, good[0], _greedy(8))
    with pytest.raises(RequestError, match=message):
        engine.add_request(model, prompt, _greedy(max_tokens))
    second = engine.add_request(OLMOE, good[1], _greedy(8))
    done = _drain(engine)
    assert set(done) == {first, second}
    # the same requests on a fresh engine give the same tokens: the failed request disturbed nothing
    ref = LLM({OLMOE: engine.models[OLMOE].path}, num_kv_blocks=8, block_size=4).generate(good, _greedy(8))
    assert [done[first].token_ids, done[second].token_ids] == _ids(ref)


def test_chunked_prefill_off_rejects_requests_over_the_token_budget(tiny_models: TinyModels) -> None:
    engine = Engine({OLMOE: tiny_models(OLMOE)}, EngineConfig(num_kv_blocks=64, block_size=4,
                                                              max_num_batched_tokens=16,
                                                              enable_chunked_prefill=False))
    with pytest.raises(RequestError, match=r"20 tokens exceed max_num_batched_tokens=16 with chunked"):
        engine.add_request(OLMOE, [3] * 10, _greedy(10))
    ok = engine.add_request(OLMOE, [3] * 10, _greedy(6))  # exactly 16: fits
    assert set(_drain(engine)) == {ok}


def test_duplicate_request_id_rejected(engine: Engine) -> None:
    engine.add_request(OLMOE, [1, 2, 3], _greedy(4), request_id="a")
    with pytest.raises(RequestError, match="duplicate request id 'a'"):
        engine.add_request(OLMOE, [4, 5, 6], _greedy(4), request_id="a")
    assert set(_drain(engine)) == {"a"}


def test_auto_ids_skip_ids_taken_by_the_caller(engine: Engine) -> None:
    taken = engine.add_request(OLMOE, [1, 2, 3], _greedy(4), request_id="req-0")
    auto = engine.add_request(OLMOE, [4, 5, 6], _greedy(4))
    assert auto != taken
    assert set(_drain(engine)) == {taken, auto}


def test_abort_waiting_and_running_requests_frees_blocks(tiny_models: TinyModels) -> None:
    engine = Engine({OLMOE: tiny_models(OLMOE)}, EngineConfig(num_kv_blocks=16, block_size=4, max_num_seqs=1))
    blocks = engine.models[OLMOE].blocks
    sched = engine.models[OLMOE].scheduler
    assert blocks is not None and sched is not None
    running = engine.add_request(OLMOE, _prompts([13], seed=7)[0], _greedy(20))
    waiting = engine.add_request(OLMOE, _prompts([9], seed=8)[0], _greedy(20))
    for _ in range(3):
        outs = engine.step()
        assert [o.request_id for o in outs] == [running]
    assert [s.request_id for s in sched.running] == [running]
    assert [s.request_id for s in sched.waiting] == [waiting]
    assert blocks.num_free < blocks.num_blocks
    engine.abort(waiting)
    assert not sched.waiting
    engine.abort(running)
    assert not sched.running and not engine.has_unfinished()
    assert blocks.num_free == blocks.num_blocks
    assert engine.step() == []
    engine.abort(running)  # aborting twice (or an unknown id) is harmless
    engine.abort("never-existed")
    # the engine still serves, with a full cache
    again = engine.add_request(OLMOE, _prompts([13], seed=7)[0], _greedy(20))
    out = _drain(engine)[again]
    assert len(out.token_ids) == 20


def test_abort_preempted_request_frees_blocks(tiny_models: TinyModels) -> None:
    engine = Engine({OLMOE: tiny_models(OLMOE)}, EngineConfig(num_kv_blocks=20, block_size=4))
    sched = engine.models[OLMOE].scheduler
    blocks = engine.models[OLMOE].blocks
    assert sched is not None and blocks is not None
    ids = [engine.add_request(OLMOE, p, _greedy()) for p in _prompts(LENGTHS, seed=9)]
    for _ in range(200):
        if sched.num_preemptions:
            break
        engine.step()
    assert sched.num_preemptions > 0
    preempted = next(s for s in sched.waiting if s.metrics.num_preemptions > 0)
    assert preempted.block_table == []
    engine.abort(preempted.request_id)
    done = _drain(engine)
    assert set(done) == set(ids) - {preempted.request_id}
    assert blocks.num_free == blocks.num_blocks


# ------------------------------------------------------------------------------------------------
# metrics and outputs


def test_metrics_and_output_fields(tiny_models: TinyModels) -> None:
    llm = LLM({OLMOE: tiny_models(OLMOE)}, num_kv_blocks=64, block_size=8)
    prompts = _prompts([5, 20, 37], seed=10)
    outs = _generate(llm, prompts, [_greedy(12)] * 3)
    for out, prompt in zip(outs, prompts, strict=True):
        assert out.prompt_token_ids == prompt and out.model == OLMOE
        assert out.ttft_s is not None and out.ttft_s > 0
        assert len(out.tbt_s) == len(out.token_ids) - 1
        assert all(t >= 0 for t in out.tbt_s)
        assert out.queue_s is not None and 0 <= out.queue_s <= out.ttft_s
        assert out.num_preemptions == 0
        assert out.text == llm.engine.models[OLMOE].tokenizer.decode(out.token_ids, skip_special_tokens=True)


def test_text_prompt_is_tokenized(tiny_models: TinyModels) -> None:
    llm = LLM({OLMOE: tiny_models(OLMOE)}, num_kv_blocks=64, block_size=8)
    text = "Hello world, this is a test."
    by_text = llm.generate(text, _greedy(10))[0]
    ids = llm.engine.models[OLMOE].tokenizer(text).input_ids
    by_ids = llm.generate([ids], _greedy(10))[0]
    assert by_text.prompt == text and by_text.prompt_token_ids == ids
    assert by_text.token_ids == by_ids.token_ids
    _assert_all_blocks_free(llm.engine)


def test_max_model_len_caps_generation(tiny_models: TinyModels) -> None:
    llm = LLM({OLMOE: tiny_models(OLMOE)}, num_kv_blocks=64, block_size=8, max_model_len=24)
    out = llm.generate([[1] * 10], SamplingParams(max_tokens=14, temperature=0.0, ignore_eos=True))[0]
    assert len(out.token_ids) == 14 and out.finish_reason == "length"
    with pytest.raises(RequestError, match="maximum context length is 24"):
        llm.generate([[1] * 10], SamplingParams(max_tokens=15, temperature=0.0))
    _assert_all_blocks_free(llm.engine)


# ------------------------------------------------------------------------------------------------
# randomized: staggered arrivals, aborts, tight caches and budgets


@pytest.mark.parametrize("trial", range(8))
def test_random_schedules_never_change_outputs(tiny_models: TinyModels, trial: int) -> None:
    rng = random.Random(trial)
    path = tiny_models(OLMOE)
    block_size = rng.choice([1, 2, 4, 8, 16])
    chunked = trial % 3 != 2
    budget = rng.choice([1, 3, 8, 16, 64]) if chunked else rng.choice([64, 128])
    reqs: list[tuple[list[int], SamplingParams]] = []
    for _ in range(rng.randint(4, 10)):
        plen, max_tokens = rng.randint(1, 40), rng.randint(1, 20)
        if not chunked and plen + max_tokens > budget:
            continue
        prompt = [rng.randrange(VOCAB_TEXT) for _ in range(plen)]
        seed = rng.randrange(1000)
        reqs.append((prompt, _greedy(max_tokens) if rng.random() < 0.5 else _sampled(seed, max_tokens)))
    need = max(-(-(len(p) + sp.max_tokens) // block_size) for p, sp in reqs)
    config = EngineConfig(num_kv_blocks=rng.randint(need, 2 * need), block_size=block_size,
                          max_num_batched_tokens=budget, enable_chunked_prefill=chunked,
                          max_num_seqs=rng.randint(1, 6))
    engine = Engine({OLMOE: path}, config)
    pending = list(reqs)
    submitted: dict[str, tuple[list[int], SamplingParams]] = {}
    aborted: set[str] = set()
    done: dict[str, RequestOutput] = {}
    for _ in range(10_000):
        if not pending and not engine.has_unfinished():
            break
        while pending and rng.random() < 0.4:
            prompt, sp = pending.pop(0)
            submitted[engine.add_request(OLMOE, prompt, sp)] = (prompt, sp)
        if engine._seqs and rng.random() < 0.03:
            victim = rng.choice(sorted(engine._seqs))
            engine.abort(victim)
            aborted.add(victim)
        for out in engine.step():
            assert out.request_id not in aborted
            if out.finished:
                done[out.request_id] = out
    _assert_all_blocks_free(engine)
    assert set(done) == set(submitted) - aborted
    ref = LLM({OLMOE: path}, num_kv_blocks=256, block_size=16)
    for rid, out in done.items():
        prompt, sp = submitted[rid]
        assert out.token_ids == ref.generate([prompt], sp)[0].token_ids, (rid, config)
