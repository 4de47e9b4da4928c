"""FFN side of a model: everything the weights pool holds and runs.

Per layer either a dense gated MLP or an MoE block: router -> family routing rule -> routed experts,
plus shared experts (DeepSeek) or a sigmoid-gated shared expert (Qwen2-MoE).
"""

from __future__ import annotations

import torch

from crosspool.kernels import torch_ref as ref
from crosspool.models.loader import FFNWeights
from crosspool.models.spec import ModelSpec


class FFNSide:
    def __init__(self, spec: ModelSpec, weights: FFNWeights, kernels: str = "torch") -> None:
        """kernels: "torch" (reference experts loop) or "triton" (`crosspool.kernels.fused_moe`)."""
        if kernels not in ("torch", "triton"):
            raise ValueError(f"kernels must be 'torch' or 'triton', got {kernels!r}")
        self.spec = spec
        self.w = weights
        self.triton = kernels == "triton"
        self._fused_route = spec.routing is not None and spec.routing.topk_method == "greedy"
        # [layers, experts] flags set to 1 for every expert a batch routes to (benchmarks' byte accounting)
        self.expert_hits: torch.Tensor | None = None

    @torch.inference_mode()
    def tune_kernels(self) -> int:
        """Tune the fused-MoE kernels for this model's expert shapes now (`fused_moe.tune`); a server does it
        at startup so that no request waits on tuning. Returns how many shapes were tuned (0 without Triton
        kernels on a GPU: the interpreter has nothing to tune)."""
        if not self.triton or self.spec.routing is None:
            return 0
        from crosspool.kernels import gemv
        from crosspool.kernels.fused_moe import tune

        shapes, routers = {}, {}
        for w in self.w.layers:
            if "experts_gate_up" in w and w["experts_gate_up"].is_cuda:
                gate_up, down = w["experts_gate_up"], w["experts_down"]
                shapes.setdefault((tuple(gate_up.shape), tuple(down.shape), gate_up.dtype), (gate_up, down))
                routers.setdefault((tuple(w["router"].shape), w["router"].dtype), w["router"])
        for gate_up, down in shapes.values():
            tune(gate_up, down, self.spec.routing.top_k)
        for router in routers.values():      # the router's skinny GEMM, at every token count it serves
            for t in gemv.token_tiles():
                gemv.linear(torch.zeros(t, router.shape[1], dtype=router.dtype, device=router.device), router,
                            use=gemv.ROUTER)
        return len(shapes)

    def forward(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        w = self.w.layers[layer]
        if "gate_up" in w:
            return _mlp(x, w["gate_up"], w["down"])
        routing = self.spec.routing
        assert routing is not None
        router = w["router"]
        if self.triton:     # decode sizes take the skinny GEMM (`kernels.gemv`, while `gemv.ROUTER` is set)
            from crosspool.kernels import gemv

            logits = gemv.linear(x.to(router.dtype), router, use=gemv.ROUTER)
        else:
            logits = ref.linear(x.to(router.dtype), router)
        if self.triton and self._fused_route:
            from crosspool.kernels.routing import route

            weights, ids = route(logits, routing)
        else:
            weights, ids = ref.route(logits, routing, w.get("score_bias"))
        if self.expert_hits is not None:
            self.expert_hits[layer, ids.reshape(-1)] = 1
        if self.triton:
            from crosspool.kernels.fused_moe import fused_moe

            out = fused_moe(x, w["experts_gate_up"], w["experts_down"], weights, ids)
        else:
            out = ref.experts(x, w["experts_gate_up"], w["experts_down"], weights, ids)
        if "shared_gate_up" in w:
            shared = _mlp(x, w["shared_gate_up"], w["shared_down"])
            if "shared_gate" in w:
                shared = torch.sigmoid(ref.linear(x, w["shared_gate"])) * shared
            out = out + shared
        return out


def _mlp(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return ref.linear(ref.silu_and_mul(ref.linear(x, gate_up)), down)
