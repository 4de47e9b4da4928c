"""The benchmark tools on tiny models (CPU): byte accounting against a hand count, and the load, transfer and
capacity tools end to end with what their numbers must satisfy."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from crosspool.bench import capacity, decode, multi_model, timeline, traffic, transfer
from crosspool.config import EngineConfig
from crosspool.engine.llm import create_engine
from crosspool.models.loader import load_spec
from crosspool.models.model import MoEModel


def test_traffic_counts_weights_once(tiny_models) -> None:  # noqa: ANN001
    model = MoEModel.load(tiny_models("tiny-qwen3-moe"), torch.float32, "cpu")
    w, spec = model.attention.w, model.spec
    layer_bytes = sum(t.numel() * 4 for layer in w.layers for t in layer.values())
    want = layer_bytes + w.final_norm.numel() * 4 + w.lm_head.numel() * 4 + 3 * spec.hidden_size * 4
    assert traffic.attention_bytes(model.attention, batch=3) == want
    ffn = model.ffn
    experts = [2.5] * spec.num_layers
    one_expert = sum(ffn.w.layers[0][k][0].numel() * 4 for k in ("experts_gate_up", "experts_down"))
    other = sum(t.numel() * 4 for layer in ffn.w.layers for k, t in layer.items() if not k.startswith("experts_"))
    assert traffic.ffn_bytes(ffn, experts) == other + 2.5 * spec.num_layers * one_expert
    # a view of a weight does not count twice
    w.layers[0]["alias"] = w.layers[0]["o_proj"][:2]
    assert traffic.attention_bytes(model.attention, batch=3) == want


def test_multi_model_bench_runs_every_request(tiny_models, tmp_path: Path) -> None:  # noqa: ANN001
    path = str(tiny_models("tiny-olmoe"))
    out = tmp_path / "mm"
    assert multi_model.main(["--model", path, "--models", "2", "--modes", "off,on", "--rate", "4",
                             "--duration-s", "2", "--prompt-len", "16", "--output-len", "40", "--kv-cache-gb", "0.25",
                             "--device", "cpu", "--out-dir", str(out)]) == 0
    result = json.loads(next(out.glob("multi-model-*.json")).read_text())
    assert result["device"] == "cpu" and result["commit"] and result["date"]
    rows = result["rows"]
    arrivals = len(multi_model.trace(["m0", "m1"], 4, 2, 16, load_spec(path).vocab_size, 0))
    for r in rows:
        assert r["requests"] == arrivals > 0
        assert 0 < r["tbt_ms_p50"] <= r["tbt_ms_p99"]
        slowest = [x["ttft_ms"] for x in r["slowest_ttft"]]
        assert len(slowest) == min(5, arrivals) and slowest == sorted(slowest, reverse=True)
        assert abs(slowest[0] - r["ttft_ms_p99"]) <= slowest[0] - slowest[-1] + 1e-6   # p99 among the slowest
    assert rows[1]["timeline"]["steps"] > 0 and (out / "timeline-2models-on.png").is_file()


def test_transfer_bench_over_gloo(capsys) -> None:  # noqa: ANN001
    assert transfer.main(["--tokens", "1,16", "--iters", "3", "--hidden", "64"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 1") or line.startswith("| 16")]
    assert len(lines) == 2
    assert all(float(v) > 0 for line in lines for v in line.strip("| ").split(" | ")[2:])


def test_capacity_bench_runs_a_request_at_the_limit(tiny_models, tmp_path: Path) -> None:  # noqa: ANN001
    out = tmp_path / "cap.json"
    assert capacity.main(["--model", str(tiny_models("tiny-olmoe")), "--copies", "2", "--run", "--device", "cpu",
                          "--json", str(out)]) == 0
    row = json.loads(out.read_text())
    assert row["tokens_one_request"] * row["kv_bytes_per_token"] <= row["kv_pool_bytes"]
    assert row["ran_prompt_tokens"] == min(row["tokens_one_request"], row["model_context_limit"]) - 8
    assert row["generated"] == 4


def test_capacity_bench_long_context_view_lifts_the_config_limit(tiny_models, tmp_path: Path) -> None:  # noqa: ANN001
    out = tmp_path / "cap.json"
    assert capacity.main(["--model", str(tiny_models("tiny-olmoe")), "--run", "--device", "cpu", "--max-position",
                          "1000000", "--run-tokens", "2600", "--json", str(out)]) == 0
    row = json.loads(out.read_text())
    assert row["model_context_limit"] == 1000000
    assert row["ran_prompt_tokens"] == min(row["tokens_one_request"], 2600) - 8 > 2048   # past the config's 2048
    assert row["generated"] == 4


def test_decode_bench_on_one_device_and_on_the_split_layout(tiny_models, tmp_path: Path) -> None:  # noqa: ANN001
    """`bench decode` times the same cells in-process and with the FFN on a weights rank (over gloo): every cell
    has a step time; the split cells carry the layout and no byte count (the weights rank routes the experts)."""
    path = str(tiny_models("tiny-olmoe"))
    common = ["--model", path, "--batch", "1,3", "--context", "24", "--output-len", "12", "--device", "cpu"]
    rows = {}
    for name, extra in (("one", []), ("split", ["--kv-devices", "cpu", "--weights-devices", "cpu,cpu"])):
        out = tmp_path / f"{name}.json"
        assert decode.main([*common, *extra, "--json", str(out)]) == 0
        result = json.loads(out.read_text())
        rows[name] = result["rows"]
        assert [(r["batch"], r["context"]) for r in rows[name]] == [(1, 24), (3, 24)]
        assert all(r["step_ms"] > 0 and r["steps"] > 0 for r in rows[name])
    # the step's wall time splits into the host's own work and its waits for launched steps' tokens
    assert all(r["host_wait_ms"] >= 0 and r["host_busy_ms"] > 0
               and abs(r["host_wait_ms"] + r["host_busy_ms"] - r["step_ms"]) < 1e-6 for r in rows["one"])
    assert all(r["bytes"] > 0 and r["experts_per_moe_layer"] > 0 for r in rows["one"])
    assert all("bytes" not in r for r in rows["split"])
    # on a GPU the cells get a bandwidth from the copy bandwidth: the split cells, without bytes, none (the
    # session-5 H200 run died there with a KeyError)
    for name, want in (("one", True), ("split", False)):
        for r in rows[name]:
            decode.add_bandwidth(r, copy_bw=3e12)
            assert ("copy_bw_fraction" in r) == want and r.get("copy_bw_fraction", 1) > 0
    assert result["layout"] == {"weights_ranks": 2, "weights_devices": ["cpu", "cpu"]}


def test_decode_cell_whose_prefill_outlasts_the_output_length(tiny_models, tmp_path: Path) -> None:  # noqa: ANN001
    """8 prompts of 96 tokens at 64 prompt tokens a step take 12+ steps to prefill, longer than the 10 tokens a
    request decodes: the first requests must still be running when the last is prefilled (the Qwen3 8k x 32
    cell hung there: the batch never filled), and nothing is left running after the cell."""
    path = str(tiny_models("tiny-olmoe"))
    config = EngineConfig(device="cpu", max_num_batched_tokens=64, max_num_seqs=8,
                          max_model_len=96 + 10 + decode.prefill_steps(8, 96, 64), kv_cache_bytes=2**24)
    engine = create_engine({"m": path}, config)
    assert decode.prefill_steps(8, 96, 64) > 10
    cell = decode.bench_cell(engine, "m", 8, 96, 10, warmup=1)
    assert cell["steps"] == 10 - 1 - decode.COUNT_STEPS - 1 and cell["step_ms"] > 0
    assert not engine.has_unfinished()


def test_engine_counts_the_host_time_blocked_on_launched_tokens(tiny_models) -> None:  # noqa: ANN001
    """`ServedModel.token_wait_s` (bench decode's host_wait_ms) grows by the time reading a launched step's tokens
    blocks: here an event that takes 20 ms to complete."""
    import time

    from crosspool.engine.graphs import LaunchedStep

    engine = create_engine({"m": str(tiny_models("tiny-olmoe"))}, EngineConfig(device="cpu", kv_cache_bytes=2**24))
    served = engine.models["m"]

    class SlowEvent:
        def synchronize(self) -> None:
            time.sleep(0.02)

    before = served.token_wait_s
    served.launched = LaunchedStep([], torch.zeros(0, dtype=torch.long), SlowEvent())   # type: ignore[arg-type]
    assert engine._read_launched(served) == [] and served.launched is None
    assert served.token_wait_s - before >= 0.02


def test_results_record_the_commit_given_by_the_run(monkeypatch) -> None:  # noqa: ANN001
    """On the device machine the tree's .git may be stale: CROSSPOOL_COMMIT (from `.run-commit`) wins."""
    from crosspool.bench import provenance

    monkeypatch.setenv("CROSSPOOL_COMMIT", "abc1234")
    got = provenance.stamp("cpu")
    assert (got["commit"], got["device"]) == ("abc1234", "cpu") and "CROSSPOOL_COMMIT" not in got["settings"]
    monkeypatch.delenv("CROSSPOOL_COMMIT")
    assert provenance.git_commit() != "abc1234"


def test_results_record_the_switches_they_ran_with(monkeypatch) -> None:  # noqa: ANN001
    """A result file says which CROSSPOOL_* switches were set (an off/on pair differs only there)."""
    from crosspool.bench import provenance

    monkeypatch.setenv("CROSSPOOL_FUSED_ROPE_ROWS", "0")
    monkeypatch.setenv("NOT_OURS", "1")
    settings = provenance.stamp("cpu")["settings"]
    assert settings["CROSSPOOL_FUSED_ROPE_ROWS"] == "0" and "NOT_OURS" not in settings
    monkeypatch.delenv("CROSSPOOL_FUSED_ROPE_ROWS")
    assert "CROSSPOOL_FUSED_ROPE_ROWS" not in provenance.stamp("cpu")["settings"]


def test_lane_overlap_counts_time_with_two_lanes_busy(tmp_path: Path) -> None:
    # lane 0 busy 0-4 and 6-8, lane 1 busy 3-7: any lane 0-8 (8 ms), two lanes 3-4 and 6-7 (2 ms)
    got = multi_model.lane_overlap([(0, 0.0, 4.0), (1, 3.0, 7.0), (0, 6.0, 8.0)])
    assert got["passes"] == 3 and got["window_ms"] == 8.0
    assert got["busy_ms"] == 8.0 and got["overlap_ms"] == 2.0 and got["overlap_frac"] == 0.25
    assert got["lane_busy_ms"] == [6.0, 4.0]
    # a gap where no lane works is not busy; one lane alone never overlaps
    alone = multi_model.lane_overlap([(0, 0.0, 1.0), (0, 3.0, 4.0)])
    assert alone["busy_ms"] == 2.0 and alone["overlap_ms"] == 0.0 and alone["window_ms"] == 4.0
    assert multi_model.lane_overlap([]) == {"passes": 0}
    spans = [{"model": m, "lane": lane, "start_ms": s, "end_ms": e}
             for m, lane, s, e in [("m0", 0, 0.0, 4.0), ("m1", 1, 3.0, 7.0), ("m2", 0, 6.0, 8.0)]]
    timeline.draw_lanes(spans, tmp_path / "lanes.png", "lanes", window_ms=10.0)
    assert (tmp_path / "lanes.png").stat().st_size > 1000


def test_lane_spans_put_every_pass_on_one_time_base(monkeypatch) -> None:  # noqa: ANN001
    """`multi_model._lane_spans` turns the per-model (lane, start, end) CUDA events into ms from the first start
    (events stand in here: `elapsed_time` is the time between two of them, as CUDA's)."""
    class Ev:
        def __init__(self, t: float) -> None:
            self.t = t

        def elapsed_time(self, other: Ev) -> float:
            return other.t - self.t

    class Graphs:
        spans: list | None = []

    monkeypatch.setattr(multi_model.torch.cuda, "synchronize", lambda: None)
    graphs = {"m0": Graphs(), "m1": Graphs()}
    events = {"m0": [(0, Ev(10.0), Ev(12.0)), (1, Ev(13.0), Ev(15.0))], "m1": [(1, Ev(5.0), Ev(11.0))]}
    spans = multi_model._lane_spans(graphs, events)
    assert all(g.spans is None for g in graphs.values())          # the recording stopped
    assert [(s["model"], s["lane"], s["start_ms"], s["end_ms"]) for s in spans] == [
        ("m1", 1, 0.0, 6.0), ("m0", 0, 5.0, 7.0), ("m0", 1, 8.0, 10.0)]


def test_critical_path_charges_each_kernel_what_it_adds_to_the_span() -> None:
    """Kernels that overlap (a PDL launch waiting on the one before) are charged only past the latest end so far;
    a kernel after an idle stretch is charged that gap; advances and gaps add up to the span, busy times do not."""
    from crosspool.bench.decode import critical_path

    kernels = [
        ("gemv", 0.0, 10.0),
        ("attention", 4.0, 15.0),     # launched early (PDL): adds 5
        ("combine", 6.0, 14.0),       # ends inside attention: adds nothing
        ("gemv", 20.0, 26.0),         # after 5 idle: adds 6
        ("norm", 26.0, 27.5),
    ]
    path = critical_path(list(reversed(kernels)))          # order of the input does not matter
    assert path["gemv"] == {"calls": 2, "busy": 16.0, "advance": 16.0, "gap": 5.0}
    assert path["attention"] == {"calls": 1, "busy": 11.0, "advance": 5.0, "gap": 0.0}
    assert path["combine"] == {"calls": 1, "busy": 8.0, "advance": 0.0, "gap": 0.0}
    assert path["norm"]["advance"] == 1.5
    span = 27.5
    assert sum(r["advance"] + r["gap"] for r in path.values()) == span
    assert sum(r["busy"] for r in path.values()) > span
    assert critical_path([]) == {}


def test_critical_path_table_from_profiler_events(capsys) -> None:  # noqa: ANN001
    """`--profile`'s critical-path table: device events only (host ops and the profiler's step marker left out),
    per step, largest advance first, with totals that add up to the span."""
    from types import SimpleNamespace

    from crosspool.bench.decode import _kernel_intervals, print_critical_path

    def event(name: str, device: str, start: float, end: float) -> SimpleNamespace:
        return SimpleNamespace(name=name, device_type=SimpleNamespace(name=device),
                               time_range=SimpleNamespace(start=start, end=end))

    events = [event("aten::mm", "CPU", 0, 50), event("ProfilerStep#1", "CUDA", 0, 60),
              event("Memcpy HtoD", "CUDA", 0, 2), event("qkv", "CUDA", 2, 12), event("attn", "CUDA", 8, 20),
              event("Memcpy HtoD", "CUDA", 30, 32), event("qkv", "CUDA", 32, 42), event("attn", "CUDA", 38, 50)]
    kernels = _kernel_intervals(events)
    assert sorted(k[0] for k in kernels) == ["Memcpy HtoD", "Memcpy HtoD", "attn", "attn", "qkv", "qkv"]
    totals = print_critical_path(kernels, steps=2)
    out = capsys.readouterr().out.splitlines()
    assert out[2].startswith("| qkv | 1 | 10.0 | 10.0 | ")          # 10 us a step, first: the largest advance
    assert out[3].startswith("| attn | 1 | 12.0 | 8.0 | ")
    assert totals["advance_us"] + totals["gap_us"] == 25.0         # a 50 us span over 2 steps
    assert "span per step 25.0 us" in out[-2]
    assert out[-1] == "longest gaps (us, before): 10.0 Memcpy HtoD"      # attn ends at 20, the copy starts at 30


def test_largest_gaps_tell_a_stall_from_a_steady_gap() -> None:
    from crosspool.bench.decode import largest_gaps

    kernels = [("a", 0.0, 10.0), ("b", 12.0, 20.0), ("c", 15.0, 18.0), ("a", 70.0, 80.0), ("b", 81.0, 90.0)]
    assert largest_gaps(kernels, n=2) == [(50.0, "a"), (2.0, "b")]     # c lies inside b: no gap before it
    assert largest_gaps([]) == []



def test_decode_bench_max_model_len(tiny_models, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    """`--max-model-len` sets the engine's (what its decode graphs size their split count by, as serving would);
    one below what the cells need is refused with the number they need."""
    import pytest

    path = str(tiny_models("tiny-olmoe"))
    common = ["--model", path, "--batch", "1", "--context", "24", "--output-len", "12", "--device", "cpu"]
    with pytest.raises(SystemExit):
        decode.main([*common, "--max-model-len", "20"])
    assert "--max-model-len 20 is below what the cells need" in capsys.readouterr().err
    out = tmp_path / "long.json"
    assert decode.main([*common, "--max-model-len", "2048", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["max_model_len"] == 2048
    rows = result["rows"]
    assert [(r["batch"], r["context"]) for r in rows] == [(1, 24)] and rows[0]["step_ms"] > 0


def test_megakernel_variants_reads_the_step_benchs_row() -> None:
    """`scripts/megakernel_variants.py`: each variant's command, and its cell from the step bench's result row (its
    worst phase's error where that is large, or why there is none)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    import megakernel_variants as mv

    assert mv.command("--splits 4 --pipelined")[1:] == ["scripts/megakernel_step_bench.py", "--splits", "4",
                                                        "--pipelined"]
    assert mv.command("@abc1234 --profile")[1:] == ["scripts/megakernel_ab.py", "run", "abc1234",
                                                    "mkb/mk_abc1234/step_bench.py", "--profile"]
    row = "| megakernel, 113 phases | 893.4 | 2492 | 0.655 | 9.5e-04 (phase 56, sum) |"
    assert mv.result("OLMoE-1B-7B shapes\n" + row + "\n", "", 0) == "893.4 (0.655)"
    for err, cell in (("3.1e-01", "893.4 (0.655), err 3.1e-01"), ("nan", "893.4 (0.655), err nan")):  # a wrong step
        assert mv.result(row.replace("9.5e-04", err), "", 0) == cell
    unchecked = row.replace("9.5e-04 (phase 56, sum)", "unchecked (--no-compute)")         # no error to show
    assert mv.result(unchecked, "", 0) == "893.4 (0.655), unchecked"
    assert mv.result("", "Traceback ...\nRuntimeError: no GPU\n", 1) == "failed, rc 1: RuntimeError: no GPU"


def test_megakernel_options_are_chains_keywords_and_kernel_constexprs() -> None:
    """`scripts/megakernel_options.py`: each flag sets its `Chain` keyword (--rank-weights turns rank_keys off) and
    its `_chain_kernel` constexpr; every keyword and constexpr exists there."""
    import argparse
    import inspect
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    import megakernel_options as mo

    from crosspool.kernels.megakernel.chain import Chain, _chain_kernel

    p = argparse.ArgumentParser()
    mo.add_options(p)
    defaults = p.parse_args([])
    assert mo.chain_kwargs(defaults) == {k: k == "rank_keys" for _, k, _, _ in mo.OPTIONS}
    flagged = mo.constexprs(p.parse_args(["--rank-weights", "--pipelined"]))
    assert flagged["KEYS"] is False and flagged["PIPE"] is True
    assert flagged["COUNTED"] is False
    chain_params = inspect.signature(Chain.__init__).parameters
    assert all(k in chain_params and chain_params[k].default == (k == "rank_keys") for _, k, _, _ in mo.OPTIONS)
    assert all(name in _chain_kernel.arg_names for _, _, name, _ in mo.OPTIONS)


def test_compile_check_counts_sass_by_python_function(tmp_path) -> None:  # noqa: ANN001
    """`scripts/megakernel_compile_check.py --by-source`: each instruction of `nvdisasm -g` output counts to the
    innermost Python function around the line it comes from."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    import megakernel_compile_check as cc

    src = tmp_path / "k.py"
    src.write_text("def outer():\n    x = 1\n\n    def inner():\n        return x\n    return inner\n")
    lined = "\n".join([
        f'\t//## File "{src}", line 2',
        "        /*0000*/                   MOV R1, c[0x0][0x28] ;",
        "        /*0010*/                   S2R R0, SR_TID.X ;",
        f'\t//## File "{src}", line 5',
        "        /*0020*/                   IADD3 R2, R0, 0x1, RZ ;",
        "        /*10030*/                  EXIT ;",
        '\t//## File "/nowhere/gone.py", line 9',
        "        /*10040*/                  BRA 0x10040 ;",
        "        /*10050*/                  NOP;",
    ])
    assert cc.by_source(lined) == {"k.py:outer": 2, "k.py:inner": 2, "gone.py:?": 2}


def test_megakernel_ncu_blocks_cuts_the_sass_at_branches(tmp_path) -> None:  # noqa: ANN001
    """`scripts/megakernel_ncu_blocks.py`: ncu's SASS page as CSV -> instructions with their stall samples, cut into
    basic blocks at branch targets and after branches."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    import megakernel_ncu_blocks as nb

    cols = ["Address", "Source", "Warp Stall Sampling (All Samples)", "Instructions Executed", "stall_long_sb",
            "stall_wait", "stall_long_sb (Not Issued)"]
    rows = [("0x100", "LDG.E R1, [R2]", 1, 4, 0, 1), ("0x110", "@!P0 BRA 0x140", 5, 4, 5, 0),
            ("0x120", "FFMA R3, R1, R1, R3", 2, 3, 0, 2), ("0x130", "FFMA R3, R1, R1, R3", 0, 3, 0, 0),
            ("0x140", "SYNCS.PHASECHK.TRANS64.TRYWAIT P5, [R33]", 7, 4, 6, 1), ("0x150", "EXIT", 0, 4, 0, 0)]
    lines = ['"Kernel Name","_chain_kernel",', ",".join(f'"{c}"' for c in cols)]
    lines += [",".join(f'"{v}"' for v in (*r, 0)) for r in rows]
    path = tmp_path / "sass.csv"
    path.write_text("\n".join(lines) + "\n")
    ins = nb.read(str(path))
    assert [i.address for i in ins] == [0x100, 0x110, 0x120, 0x130, 0x140, 0x150]
    assert ins[1].stalls == {"long_sb": 5} and ins[4].samples == 7 and ins[2].executed == 3
    bs = nb.blocks(ins)
    assert [[i.address for i in b.instructions] for b in bs] == [[0x100, 0x110], [0x120, 0x130], [0x140, 0x150]]
    assert bs[1].opcodes()["FFMA"] == 2 and bs[2].stalls() == {"long_sb": 6, "wait": 1} and bs[0].samples == 6
