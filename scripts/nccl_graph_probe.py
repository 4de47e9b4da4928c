"""Can one CUDA graph per side hold a whole pass's NCCL point-to-point traffic? (issue 8)

Two ranks (`python -m torch.distributed.run --nproc-per-node 2 scripts/nccl_graph_probe.py`): rank 0 plays the KV
side (per layer: a kernel, send x, receive y), rank 1 the weights side (receive x, a kernel, send y). Each side
captures its pass as one graph after an eager warm-up exchange (which connects the pair), replays it against the
other's replay, checks the values, times a pass (eager vs graph, with the per-pass gloo header rank 1 waits for),
and checks that eager traffic still pairs up after replays.
"""

from __future__ import annotations

import gc
import os
import threading
import time

import torch
import torch.distributed as dist

LAYERS, ROWS, HIDDEN = 16, 1, 2048


def kv_pass(a: torch.Tensor) -> torch.Tensor:
    for _ in range(LAYERS):
        x = a * 2
        y = torch.empty_like(x)
        works = [dist.isend(x, 1), dist.irecv(y, 1)]
        for w in works:
            w.wait()
        a = y + 1
    return a


def weights_pass(xbuf: torch.Tensor, keep: list) -> None:
    sends = []
    for _ in range(LAYERS):
        dist.irecv(xbuf, 0).wait()
        y = xbuf * 3
        keep.append(y)
        sends.append(dist.isend(y, 0))
    for w in sends:
        w.wait()


def expected(a0: float) -> float:
    a = a0
    for _ in range(LAYERS):
        a = a * 2 * 3 + 1
    return a


def main() -> None:
    rank = int(os.environ["RANK"])
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl")
    control = dist.new_group(backend="gloo")
    dist.all_reduce(torch.zeros(1, device="cuda"))
    dev = torch.device("cuda", rank)
    a = torch.full((ROWS, HIDDEN), 1e-30, device=dev)   # small: the values stay finite over 16 layers
    xbuf = torch.empty(ROWS, HIDDEN, device=dev)
    header = torch.zeros(4, dtype=torch.int64)
    # eager warm-up: connects the pair (no connection setup may happen inside a capture)
    for _ in range(3):
        if rank == 0:
            kv_pass(a)
        else:
            weights_pass(xbuf, [])
    torch.cuda.synchronize()

    def eager_pass() -> torch.Tensor | None:
        if rank == 0:
            dist.send(header, 1, group=control)
            return kv_pass(a)
        dist.recv(header, 0, group=control)
        weights_pass(xbuf, [])
        return None

    t0 = time.perf_counter()
    for _ in range(50):
        eager_pass()
    torch.cuda.synchronize()
    eager_ms = (time.perf_counter() - t0) / 50 * 1e3

    graph = torch.cuda.CUDAGraph()
    keep: list = []
    out = None
    status = "captured"
    try:
        with torch.cuda.graph(graph):
            if rank == 0:
                out = kv_pass(a)
            else:
                weights_pass(xbuf, keep)
    except Exception as e:  # noqa: BLE001
        status = f"capture failed: {type(e).__name__}: {e}"
    print(f"rank {rank}: {status}", flush=True)
    dist.barrier(group=control)
    if not status.startswith("captured"):
        return

    def graph_pass() -> None:
        if rank == 0:
            dist.send(header, 1, group=control)
        else:
            dist.recv(header, 0, group=control)
        graph.replay()

    graph_pass()
    torch.cuda.synchronize()
    if rank == 0:
        want = expected(1e-30)
        got = out[0, 0].item()
        print(f"rank 0: graph value {got:.6e} want {want:.6e} ok={abs(got - want) <= 1e-3 * abs(want)}", flush=True)
    t0 = time.perf_counter()
    for _ in range(200):
        graph_pass()
    torch.cuda.synchronize()
    graph_ms = (time.perf_counter() - t0) / 200 * 1e3
    # eager traffic after replays still pairs up
    after = eager_pass()
    torch.cuda.synchronize()
    if after is not None:
        want = expected(1e-30)
        print(f"rank 0: eager pass after replays ok={abs(after[0, 0].item() - want) <= 1e-3 * abs(want)}", flush=True)
    print(f"rank {rank}: {LAYERS}-layer pass eager {eager_ms:.3f} ms  graph {graph_ms:.3f} ms", flush=True)
    dist.barrier(group=control)
    # the teardown with the graph still alive hung in session 6's first probe: drop the graph first
    graph.reset()
    keep.clear()
    out = None  # noqa: F841
    gc.collect()
    torch.cuda.synchronize()
    teardown = threading.Thread(target=dist.destroy_process_group, daemon=True)
    teardown.start()
    teardown.join(30)
    print(f"rank {rank}: teardown after dropping the graph: {'HUNG' if teardown.is_alive() else 'ok'}", flush=True)
    if teardown.is_alive():
        from torch.distributed.distributed_c10d import _abort_process_group

        _abort_process_group()
        print(f"rank {rank}: aborted", flush=True)


if __name__ == "__main__":
    main()
