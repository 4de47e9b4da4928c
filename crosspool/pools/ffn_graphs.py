"""CUDA graphs of a model's FFN sub-steps on a weights rank.

Across pool ranks the KV rank replays its attention sub-steps as graphs (`engine.substeps`) and sends each
layer's hidden states padded to the graph bucket, so a decode step arrives here as `bucket` rows. Each
(layer, bucket) FFN is one graph over a static input buffer: the received rows are copied in, the graph
replays, and the output is copied out to a fresh tensor (it is sent while the next layer's graph may
already write the static output). Other token counts (prefill, mixed steps) run eagerly.
`capture=False` (CPU) runs the same functions on the same buffers without graphs.

With one KV rank a decode pass is also one graph per (lane, bucket) (`capture_passes`): for every layer it
receives the rows from the KV rank into the static input, runs the FFN and sends the output, all NCCL operations
inside the graph on the lane's communicator, so the host replays a whole pass on one header
(`transport.Exchange.begin_pass`). Two lanes' passes of different models run at once; a model's static input
is shared by its lanes, which is safe because a model's next pass starts only after the KV rank received the
previous one's last output.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from crosspool.engine.graphs import buckets_up_to, capture, capture_stream
from crosspool.models.ffn_side import FFNSide


class FFNGraphs:
    def __init__(self, ffn: FFNSide, dtype: torch.dtype, device: torch.device, max_batch: int,
                 capture: bool = True) -> None:
        self.ffn = ffn
        self.device = device
        self.capture = capture
        self.buckets = buckets_up_to(max_batch)
        self.x = torch.zeros(max_batch, ffn.spec.hidden_size, dtype=dtype, device=device)
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        # (KV rank, lane, bucket) -> the whole pass as one graph, and the outputs it sends (alive while it lives)
        self.passes: dict[tuple[int, int, int], tuple[torch.cuda.CUDAGraph, list[torch.Tensor]]] = {}

    def fits(self, tokens: int) -> bool:
        return tokens in self.buckets

    def release(self) -> None:
        """Destroy the captured graphs now (the pass graphs hold NCCL resources the world's teardown waits for)."""
        for graph, _ in [*self.graphs.values(), *self.passes.values()]:
            graph.reset()
        self.graphs.clear()
        self.passes.clear()

    def capture_all(self) -> int:
        """Capture every (layer, bucket) now, largest bucket first; returns how many graphs were captured."""
        if self.capture:
            for bucket in reversed(self.buckets):
                for layer in range(self.ffn.spec.num_layers):
                    self._ensure(layer, bucket)
        return len(self.graphs)

    def _fn(self, layer: int, bucket: int):  # noqa: ANN202
        @torch.inference_mode()
        def ffn() -> torch.Tensor:
            return self.ffn.forward(layer, self.x[:bucket])
        return ffn

    def _ensure(self, layer: int, bucket: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        if (layer, bucket) not in self.graphs:
            graph, out = capture(self._fn(layer, bucket), self.device, self.pool)
            assert out is not None
            self.graphs[layer, bucket] = graph, out
        return self.graphs[layer, bucket]

    def run(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """The FFN of x (`fits(len(x))` rows) through the static buffers."""
        tokens = x.shape[0]
        self.x[:tokens].copy_(x)
        if not self.capture:
            return self._fn(layer, tokens)()
        graph, out = self._ensure(layer, tokens)
        graph.replay()
        return out.clone()

    def capture_passes(self, src: int, lanes: int, out_dtype: torch.dtype) -> int:
        """Capture, for every lane and bucket, a pass of KV rank `src` as one graph: per layer receive the rows,
        run the FFN, send the output (in `out_dtype`), on the lane's communicator. Each lane has its own graph
        memory (two lanes' passes run at once). The pairs must be connected already (`world.connect_pairs`)
        and the kernels compiled (`capture_all` ran them). Returns how many graphs were captured."""
        from crosspool.pools.world import lane_group

        for lane in range(lanes):
            pool = torch.cuda.graph_pool_handle()
            stream = capture_stream(self.device, ("lane", lane))     # lanes replay at once: own cuBLAS workspace
            for bucket in reversed(self.buckets):
                graph, outs = torch.cuda.CUDAGraph(), []
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    self._pass(src, lane_group(lane), bucket, out_dtype, outs)
                self.passes[src, lane, bucket] = graph, outs
        torch.cuda.synchronize(self.device)
        return len(self.passes)

    @torch.inference_mode()
    def _pass(self, src: int, group: dist.ProcessGroup, bucket: int, out_dtype: torch.dtype,
              outs: list[torch.Tensor]) -> None:
        x = self.x[:bucket]
        sends = []
        for layer in range(self.ffn.spec.num_layers):
            dist.irecv(x, src, group=group).wait()     # after the previous layer's FFN read x (stream order)
            y = self.ffn.forward(layer, x).to(out_dtype).contiguous()
            outs.append(y)
            sends.append(dist.isend(y, src, group=group))
        for work in sends:                             # joins the sends back into the captured stream
            work.wait()

    def replay_pass(self, src: int, lane: int, bucket: int) -> bool:
        """Replay KV rank `src`'s pass of `bucket` rows in `lane` (on the current stream); False if there is
        no graph of it."""
        entry = self.passes.get((src, lane, bucket))
        if entry is None:
            return False
        entry[0].replay()
        return True
