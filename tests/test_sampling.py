"""Sampler on synthetic logits, SamplingParams validation, and stop conditions through the engine."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from crosspool import LLM, EngineConfig, SamplingParams
from crosspool.engine.engine import Engine
from crosspool.engine.output import RequestOutput
from crosspool.engine.sampler import apply_penalties, sample

TinyModels = Callable[[str], Path]
MODEL = "tiny-olmoe"
PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time"
CONFIG = dict(num_kv_blocks=64, block_size=8)


# ------------------------------------------------------------------------------------------------
# sampler unit tests


def _logits(rows: int, vocab: int, seed: int) -> torch.Tensor:
    return 3.0 * torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed))


def _draw(logits: torch.Tensor, params: SamplingParams, n: int, seed: int) -> torch.Tensor:
    """n samples from one row of logits through `sample`, one shared seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    return torch.tensor(sample(logits.expand(n, -1).contiguous(), [params] * n, [gen] * n)[0])


def test_greedy_is_argmax() -> None:
    logits = _logits(16, 100, seed=0)
    out, _ = sample(logits, [SamplingParams(temperature=0.0)] * 16, [None] * 16)
    assert out == logits.argmax(-1).tolist()
    assert len(set(out)) > 1  # rows really differ: the comparison is not trivially one value


@pytest.mark.parametrize("temperature", [0.3, 1.0, 5.0, 100.0])
def test_top_k_1_is_greedy_at_any_temperature(temperature: float) -> None:
    logits = _logits(16, 100, seed=1)
    gen = torch.Generator().manual_seed(0)
    params = [SamplingParams(temperature=temperature, top_k=1)] * 16
    assert sample(logits, params, [gen] * 16)[0] == logits.argmax(-1).tolist()


def test_tiny_top_p_keeps_only_the_best_token() -> None:
    logits = _logits(16, 100, seed=2)
    gen = torch.Generator().manual_seed(0)
    params = [SamplingParams(temperature=2.0, top_p=1e-6)] * 16
    for _ in range(5):
        assert sample(logits, params, [gen] * 16)[0] == logits.argmax(-1).tolist()


def test_top_k_restricts_support() -> None:
    row = _logits(1, 64, seed=3)[0]
    top5 = set(torch.topk(row, 5).indices.tolist())
    # a high temperature flattens the distribution: without top-k nearly every token would show up
    draws = _draw(row, SamplingParams(temperature=5.0, top_k=5), 3000, seed=0)
    assert set(draws.tolist()) == top5
    unrestricted = _draw(row, SamplingParams(temperature=5.0), 3000, seed=0)
    assert len(set(unrestricted.tolist()) - top5) > 20


def test_top_p_keeps_the_nucleus_and_renormalises() -> None:
    probs = torch.tensor([0.5, 0.3, 0.1, 0.06, 0.04])
    row = probs.log()
    # mass before token 1 is 0.5 < 0.75 (kept), before token 2 it is 0.8 >= 0.75 (dropped)
    draws = _draw(row, SamplingParams(temperature=1.0, top_p=0.75), 8000, seed=1)
    counts = torch.bincount(draws, minlength=5).float()
    assert counts[2:].sum() == 0
    assert abs(counts[0] / counts.sum() - 0.5 / 0.8) < 0.03


def test_seeded_generator_is_reproducible() -> None:
    row = _logits(1, 50, seed=4)[0]
    params = SamplingParams(temperature=1.0)
    a = _draw(row, params, 200, seed=123)
    b = _draw(row, params, 200, seed=123)
    c = _draw(row, params, 200, seed=124)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_temperature_sampling_matches_softmax() -> None:
    row = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0, 2.0])
    temperature, n = 0.7, 20000
    draws = _draw(row, SamplingParams(temperature=temperature), n, seed=7)
    counts = torch.bincount(draws, minlength=6).float()
    # 5 degrees of freedom: P(chi2 > 25) ~ 1.4e-4; the seed is fixed, so this is deterministic anyway
    assert _chi_square(counts, torch.softmax(row / temperature, -1)) < 25
    # ...and the test can tell temperatures apart: the untempered softmax is rejected by far
    assert _chi_square(counts, torch.softmax(row, -1)) > 200


def test_each_row_uses_its_own_params_and_generator() -> None:
    logits = _logits(3, 40, seed=5)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, seed=9),
              SamplingParams(temperature=1.0, top_k=1)]
    gens: list[torch.Generator | None] = [None, torch.Generator().manual_seed(9),
                                          torch.Generator().manual_seed(1)]
    out, _ = sample(logits, params, gens)
    expected_row1 = int(torch.multinomial(torch.softmax(logits[1], -1), 1,
                                          generator=torch.Generator().manual_seed(9)).item())
    assert out == [int(logits[0].argmax()), expected_row1, int(logits[2].argmax())]


def test_unseeded_rows_are_drawn_together_with_their_own_params() -> None:
    """Rows without a seed share one batched draw; each still obeys its own temperature/top-k/top-p."""
    torch.manual_seed(0)
    row = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0, 2.0])
    n = 20000
    params = [SamplingParams(temperature=0.8, top_k=4)] * n
    draws = torch.tensor(sample(row.expand(n, -1).contiguous(), params, [None] * n)[0])
    counts = torch.bincount(draws, minlength=6).float()
    allowed = row >= torch.topk(row, 4).values[-1]
    assert counts[~allowed].sum() == 0                                    # outside the top 4: never
    want = torch.softmax((row / 0.8).masked_fill(~allowed, float("-inf")), -1)
    assert _chi_square(counts[allowed], want[allowed]) < 20               # 3 d.o.f.: P(>20) ~ 2e-4
    assert _chi_square(counts[allowed], torch.softmax(row[allowed], -1)) > 200   # temperature matters
    # mixed parameters in one batch
    logits = _logits(4, 50, seed=6)
    mixed = [SamplingParams(temperature=2.0, top_k=1), SamplingParams(temperature=1.5, top_p=1e-6),
             SamplingParams(temperature=1.0, top_k=2), SamplingParams(temperature=0.0)]
    for _ in range(20):
        out, _ = sample(logits, mixed, [None] * 4)
        assert out[0] == int(logits[0].argmax()) and out[1] == int(logits[1].argmax())
        assert out[2] in torch.topk(logits[2], 2).indices.tolist() and out[3] == int(logits[3].argmax())


def test_top_p_nucleus_in_the_batched_draw() -> None:
    torch.manual_seed(1)
    row = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    n = 8000
    draws = torch.tensor(sample(row.expand(n, -1).contiguous(), [SamplingParams(top_p=0.8)] * n, [None] * n)[0])
    counts = torch.bincount(draws, minlength=4).float()
    assert counts[2:].sum() == 0                                          # 0.5 + 0.3 reach 0.8: the rest drop
    assert _chi_square(counts[:2], torch.tensor([0.5, 0.3]) / 0.8) < 15


# ------------------------------------------------------------------------------------------------
# SamplingParams validation


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -3}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": -2}, "top_k"),
        ({"stop": ["ok", ""]}, "stop"),
    ],
)
def test_sampling_params_validation(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)  # type: ignore[arg-type]


def test_sampling_params_accepts_edges() -> None:
    p = SamplingParams(max_tokens=1, temperature=0.0, top_p=1.0, top_k=-1, stop="x")
    assert p.greedy and p.stop == ["x"]
    assert not SamplingParams(temperature=1e-3).greedy


# ------------------------------------------------------------------------------------------------
# stop conditions through the engine


def _greedy(**kwargs: object) -> SamplingParams:
    """Greedy, 40 tokens, eos ignored: the reference run's settings, plus `kwargs`."""
    return SamplingParams(**{"max_tokens": 40, "temperature": 0.0, "ignore_eos": True, **kwargs})  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def llm(tiny_models: TinyModels) -> LLM:
    return LLM({MODEL: tiny_models(MODEL)}, **CONFIG)


@pytest.fixture(scope="module")
def reference(llm: LLM) -> RequestOutput:
    """A greedy run that ignores eos: the text and tokens every stop condition is cut from."""
    out = llm.generate(PROMPT, _greedy())[0]
    assert len(out.token_ids) == 40 and out.finish_reason == "length"
    return out


def _stream(engine: Engine, prompt: str, params: SamplingParams) -> tuple[list[str], RequestOutput]:
    rid = engine.add_request(MODEL, prompt, params)
    pieces: list[str] = []
    final: RequestOutput | None = None
    while engine.has_unfinished():
        for out in engine.step():
            assert out.request_id == rid and final is None
            pieces.append(out.new_text)
            if out.finished:
                final = out
    assert final is not None
    blocks = engine.models[MODEL].blocks
    assert blocks.num_free == blocks.num_blocks
    return pieces, final


def _printable(s: str) -> bool:
    return all(32 <= ord(c) < 127 for c in s)


def test_max_tokens_finishes_with_length(llm: LLM, reference: RequestOutput) -> None:
    out = llm.generate(PROMPT, SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True))[0]
    assert out.finish_reason == "length"
    assert out.token_ids == reference.token_ids[:7]


def test_stop_string_truncates_text(llm: LLM, reference: RequestOutput) -> None:
    text = reference.text
    # a printable stop string taken from the middle of the reference text, at its first occurrence
    stop = next(text[i:i + 3] for i in range(8, len(text) - 3)
                if _printable(text[i:i + 3]) and text.find(text[i:i + 3]) == i)
    at = text.find(stop)
    out = llm.generate(PROMPT, _greedy(stop=[stop]))[0]
    assert out.finish_reason == "stop"
    assert out.text == text[:at]
    assert stop not in out.text
    assert len(out.token_ids) < len(reference.token_ids)
    assert out.token_ids == reference.token_ids[: len(out.token_ids)]


def test_earliest_of_several_stop_strings_wins(llm: LLM, reference: RequestOutput) -> None:
    text = reference.text
    cands = [i for i in range(4, len(text) - 2)
             if _printable(text[i:i + 2]) and text.find(text[i:i + 2]) == i]
    early, late = text[cands[0]:cands[0] + 2], text[cands[-1]:cands[-1] + 2]
    out = llm.generate(PROMPT, _greedy(stop=[late, early]))[0]
    assert out.finish_reason == "stop"
    assert out.text == text[: text.find(early)]


def test_stop_token_ids(llm: LLM, reference: RequestOutput) -> None:
    ids = reference.token_ids
    k = next(i for i in range(5, len(ids)) if ids[i] not in ids[:i])  # first occurrence at k
    out = llm.generate(PROMPT, SamplingParams(max_tokens=40, temperature=0.0, stop_token_ids=[ids[k]]))[0]
    assert out.finish_reason == "stop"
    assert out.token_ids == ids[: k + 1]


def _with_eos(src: Path, dst: Path, eos: int) -> Path:
    """A copy of checkpoint `src` whose generation config says `eos` ends a sequence."""
    shutil.copytree(src, dst)
    gen = json.loads((dst / "generation_config.json").read_text())
    gen["eos_token_id"] = eos
    (dst / "generation_config.json").write_text(json.dumps(gen))
    return dst


def test_eos_stops_unless_ignore_eos(tiny_models: TinyModels, reference: RequestOutput,
                                     tmp_path: Path) -> None:
    ids = reference.token_ids
    k = next(i for i in range(3, len(ids)) if ids[i] not in ids[:i])
    llm = LLM({MODEL: _with_eos(tiny_models(MODEL), tmp_path / "eos", ids[k])}, **CONFIG)
    assert ids[k] in llm.engine.models[MODEL].eos_ids
    stopped, ignored = llm.generate(
        [PROMPT, PROMPT],
        [SamplingParams(max_tokens=40, temperature=0.0), SamplingParams(max_tokens=40, temperature=0.0,
                                                                        ignore_eos=True)],
    )
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == ids[: k + 1]
    assert ignored.finish_reason == "length"
    assert ignored.token_ids == ids


def test_streaming_pieces_concatenate_to_final_text(llm: LLM, reference: RequestOutput) -> None:
    pieces, final = _stream(llm.engine, PROMPT, _greedy())
    assert len(pieces) == 40
    assert "".join(pieces) == final.text == reference.text


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_streaming_sampled_text_with_partial_characters(llm: LLM, seed: int) -> None:
    # random byte-level tokens split multi-byte characters: pieces hold them back, the join is still exact
    params = SamplingParams(max_tokens=48, temperature=1.5, seed=seed, ignore_eos=True)
    pieces, final = _stream(llm.engine, PROMPT, params)
    assert "".join(pieces) == final.text
    assert final.text == llm.engine.models[MODEL].tokenizer.decode(final.token_ids, skip_special_tokens=True)


def test_streaming_stop_string_across_tokens(llm: LLM, reference: RequestOutput) -> None:
    """A stop string whose first characters arrived with an earlier token: those characters must not have
    been streamed already, so the streamed pieces still add up to the (truncated) final text."""
    pieces, _ = _stream(llm.engine, PROMPT, _greedy())
    text = "".join(pieces)
    bounds: list[int] = []
    pos = 0
    for p in pieces:
        pos += len(p)
        bounds.append(pos)
    stop = None
    for b in bounds:
        cand = text[b - 2:b + 1]
        if b >= 2 and len(cand) == 3 and _printable(cand) and text.find(cand) == b - 2:
            stop = cand
            break
    assert stop is not None, "no token boundary inside printable text"
    params = _greedy(stop=[stop])
    pieces2, final = _stream(llm.engine, PROMPT, params)
    assert final.finish_reason == "stop"
    assert final.text == text[: text.find(stop)]
    assert "".join(pieces2) == final.text


def test_stop_string_set_but_finishing_by_length_keeps_full_text(llm: LLM, reference: RequestOutput) -> None:
    never = "\x00never\x00"
    out = llm.generate(PROMPT, _greedy(stop=[never]))[0]
    assert out.finish_reason == "length"
    assert out.token_ids == reference.token_ids
    assert out.text == reference.text
    # the same for a text that ends inside a multi-byte character: a stop list that never matches must
    # not change the final text (the trailing replacement character stays, as without stop strings)
    for seed in range(50):
        plain = SamplingParams(max_tokens=12, temperature=1.5, seed=seed, ignore_eos=True)
        a = llm.generate(PROMPT, plain)[0]
        if a.text.endswith("\ufffd"):
            break
    else:
        pytest.fail("no sampled text ends inside a character")
    b = llm.generate(PROMPT, SamplingParams(max_tokens=12, temperature=1.5, seed=seed, ignore_eos=True,
                                            stop=[never]))[0]
    assert b.token_ids == a.token_ids
    assert b.text == a.text


def test_default_config_is_fp32_on_cpu() -> None:
    assert EngineConfig().dtype == torch.float32


def test_penalties_follow_openai_semantics() -> None:
    logits = torch.zeros(1, 6)
    logits[0, 2] = 1.0
    # token 2 generated 3 times: frequency 0.5 -> -1.5, presence 0.2 -> -0.2; token 4 once: -0.5 - 0.2
    p = SamplingParams(temperature=0.0, frequency_penalty=0.5, presence_penalty=0.2)
    row = apply_penalties(logits[0], p, [2, 2, 2, 4])
    assert torch.allclose(row, torch.tensor([0.0, 0.0, 1.0 - 1.7, 0.0, -0.7, 0.0]))
    assert sample(logits, [p], [None], [[2, 2, 2, 4]])[0] == [0]          # greedy sees the penalties
    assert sample(logits, [SamplingParams(temperature=0.0)], [None], [[2, 2, 2]])[0] == [2]


def test_logprobs_are_the_raw_distribution() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=gen)
    params = [SamplingParams(temperature=0.0, logprobs=5), SamplingParams(temperature=0.7, logprobs=0, seed=1),
              SamplingParams(temperature=0.0)]
    tokens, lps = sample(logits, params, [None, torch.Generator().manual_seed(1), None])
    ref = torch.log_softmax(logits, dim=-1)
    assert lps[2] is None
    assert lps[0].token_id == tokens[0] and abs(lps[0].logprob - float(ref[0, tokens[0]])) < 1e-6
    assert [t for t, _ in lps[0].top] == torch.topk(ref[0], 5).indices.tolist()
    assert lps[1].top == [] and abs(lps[1].logprob - float(ref[1, tokens[1]])) < 1e-6
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(logprobs=21)
    with pytest.raises(ValueError, match="presence_penalty"):
        SamplingParams(presence_penalty=3.0)
