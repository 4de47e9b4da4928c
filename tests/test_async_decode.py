"""Async decode (the engine launches greedy decode step n+1, its tokens fed on the device, before it reads
step n's): the same tokens, texts and finish reasons as the synchronous engine, including stops seen one step
late, max_tokens, requests arriving mid-run, sampled requests mixed in (they force synchronous steps), and
aborts. CPU: the Triton kernels run in the interpreter and the decode graphs' static buffers run eagerly."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from crosspool import EngineConfig, SamplingParams  # noqa: E402
from crosspool.engine.engine import Engine  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


_OPEN: list[Engine] = []      # engines a test made, closed after it (on a GPU each holds KV pages and graphs)


@pytest.fixture(autouse=True)
def _close_engines() -> Iterator[None]:
    yield
    while _OPEN:
        _OPEN.pop().close()


def _engine(path, async_decode: bool, **config: object) -> Engine:  # noqa: ANN001
    engine = Engine({"m": path}, EngineConfig(device=DEVICE, dtype=torch.float32, kernels="triton", cuda_graphs=True,
                                              async_decode=async_decode, block_size=4, max_num_seqs=8, **config))
    _OPEN.append(engine)
    return engine


def _run(engine: Engine, requests: list[tuple[int, list[int], SamplingParams]], abort: tuple[int, str] | None = None
         ) -> tuple[dict[str, tuple], int]:
    """requests: (engine step at which it arrives, prompt, params). Returns {request id: (tokens, text, finish
    reason)} and how many steps found a launched step in flight."""
    done: dict[str, tuple] = {}
    pending = sorted(requests, key=lambda r: r[0])
    ids = []
    step = overlapped = 0
    while pending or engine.has_unfinished():
        while pending and pending[0][0] <= step:
            _, prompt, params = pending.pop(0)
            ids.append(engine.add_request("m", prompt, params, request_id=f"r{len(ids)}"))
        if abort is not None and step == abort[0]:
            engine.abort(abort[1])
        for out in engine.step():
            if out.finished:
                done[out.request_id] = (out.token_ids, out.text, out.finish_reason)
        overlapped += engine.models["m"].launched is not None
        step += 1
    return done, overlapped


@pytest.fixture(scope="module")
def path(tiny_models):  # noqa: ANN001, ANN201
    return tiny_models("tiny-qwen3-moe")


def _prompts(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 500, (int(k),), generator=g).tolist() for k in torch.randint(3, 12, (n,), generator=g)]


def test_async_equals_sync_with_stops_arrivals_and_sampling(path) -> None:  # noqa: ANN001
    prompts = _prompts(5, 0)
    greedy = SamplingParams(max_tokens=9, temperature=0, ignore_eos=True)
    ref, _ = _run(_engine(path, False), [(0, prompts[0], greedy)])
    stop_token = ref["r0"][0][4]          # a token the first request generates: it stops there
    requests = [
        (0, prompts[0], SamplingParams(max_tokens=9, temperature=0, ignore_eos=True, stop_token_ids=[stop_token])),
        (0, prompts[1], greedy),
        (3, prompts[2], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)),   # arrives mid-run
        (7, prompts[3], SamplingParams(max_tokens=5, temperature=0.8, seed=3, ignore_eos=True)),   # sampled
        (9, prompts[4], SamplingParams(max_tokens=7, temperature=0, ignore_eos=True, stop=["a"])),
    ]
    sync, overlapped_sync = _run(_engine(path, False), requests)
    fast, overlapped = _run(_engine(path, True), requests)
    assert fast == sync
    assert overlapped_sync == 0 and overlapped > 5          # the async steps really overlapped
    assert fast["r0"][2] == "stop" and fast["r0"][0][-1] == stop_token
    assert [len(fast[f"r{i}"][0]) for i in (1, 2, 3)] == [9, 6, 5]


def test_preemption_under_graphs_and_async_decode(path) -> None:  # noqa: ANN001
    """Too few KV blocks: sequences are preempted and recomputed, come back with new block tables, and the
    graph path's staging rows (which keep table entries already written) must pick those up."""
    greedy = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    requests = [(0, p, greedy) for p in _prompts(3, 2)]
    want, _ = _run(Engine({"m": path}, EngineConfig(dtype=torch.float32, block_size=4, num_kv_blocks=9)), requests)
    engine = _engine(path, True, num_kv_blocks=9)
    got, _ = _run(engine, requests)
    assert engine.models["m"].scheduler.num_preemptions > 0
    assert got == want


def test_abort_during_async_decode_frees_blocks(path) -> None:  # noqa: ANN001
    prompts = _prompts(3, 1)
    greedy = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    requests = [(0, p, greedy) for p in prompts]
    sync, _ = _run(_engine(path, False), requests, abort=(6, "r1"))
    engine = _engine(path, True)
    fast, _ = _run(engine, requests, abort=(6, "r1"))
    assert fast["r0"] == sync["r0"] and fast["r2"] == sync["r2"]
    assert "r1" not in fast                                  # aborted: no final output
    assert engine.models["m"].blocks.num_used == 0           # every block back


@pytest.mark.parametrize("seed", [0])
def test_async_equals_sync_on_random_workloads(path, seed: int) -> None:  # noqa: ANN001
    """Random arrivals, lengths, stop tokens taken from the sync run, greedy and seeded-sampled requests, an
    abort: the async engine gives exactly the sync engine's results."""
    g = torch.Generator().manual_seed(100 + seed)
    n = 6
    prompts = _prompts(n, seed + 10)
    arrive = torch.randint(0, 8, (n,), generator=g).tolist()
    lengths = torch.randint(2, 10, (n,), generator=g).tolist()
    plain = [(arrive[i], prompts[i], SamplingParams(max_tokens=lengths[i], temperature=0, ignore_eos=True))
             for i in range(n)]
    first, _ = _run(_engine(path, False), plain)
    requests = []
    for i in range(n):
        tokens = first[f"r{i}"][0]
        stops = [tokens[len(tokens) // 2]] if i % 3 == 0 else []          # stop mid-way on a token it makes
        temperature = 0.7 if i % 4 == 1 else 0.0
        requests.append((arrive[i], prompts[i], SamplingParams(max_tokens=lengths[i], temperature=temperature,
                                                               seed=i, ignore_eos=True, stop_token_ids=stops)))
    victim = ("r5" if arrive[5] < 6 else "r4")
    sync, _ = _run(_engine(path, False), requests, abort=(6, victim))
    fast, _ = _run(_engine(path, True), requests, abort=(6, victim))
    assert fast == sync


def test_capture_keeps_the_step_in_flight_inputs() -> None:
    """A graph captured while a step is being launched (its bucket's first use) runs once on padding rows
    first; the metadata of the step and the previous step's tokens must come back unchanged."""
    from crosspool.engine.graphs import SLOTS, DecodeInputs

    inputs = DecodeInputs(torch.device("cpu"), max_batch=8, max_model_len=64, block_size=4)
    inputs.meta.copy_(torch.arange(40).view(5, 8))
    inputs.tokens.copy_(torch.arange(100, 108))
    before_meta, before_tokens = inputs.meta.clone(), inputs.tokens.clone()
    with inputs.padding_only(4):
        assert (inputs.meta[SLOTS, :4] == -1).all() and (inputs.meta[SLOTS, 4:] == before_meta[SLOTS, 4:]).all()
        inputs.tokens.zero_()                       # what a warm-up run's argmax write does
        inputs.meta.fill_(7)
    assert torch.equal(inputs.tokens, before_tokens)
    assert torch.equal(inputs.meta[:, :4], before_meta[:, :4])
