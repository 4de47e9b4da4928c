"""FFN side of a model: everything the weights pool holds and runs.

Per layer either a dense gated MLP or an MoE block: router -> family routing rule -> routed experts,
plus shared experts (DeepSeek) or a sigmoid-gated shared expert (Qwen2-MoE).
"""

from __future__ import annotations

import torch

from crosspool.kernels import torch_ref as ref
from crosspool.models.batch import PendingNorm, TopKPartials, reduced
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
                routers.setdefault((tuple(w["router"].shape), w["router"].dtype), w)
        for gate_up, down in shapes.values():
            tune(gate_up, down, self.spec.routing.top_k)
        for w in routers.values():      # the router's skinny GEMM and routing, at every token count they serve
            router = w["router"]
            for t in gemv.token_tiles():
                x = torch.zeros(t, router.shape[1], dtype=router.dtype, device=router.device)
                self._route(w, x)
                if self.takes_pending_norm() and t <= gemv.ROUTER_NORM:   # ... with the norm inside the GEMM
                    from crosspool.kernels.routing import norm_route_linear

                    assert self.spec.routing is not None
                    norm_route_linear(x, x, torch.ones_like(x[0]), 1e-6, router, self.spec.routing)
        return len(shapes)

    def forward(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return reduced(self.forward_partial(layer, x))

    def takes_pending_norm(self) -> bool:
        """Whether `forward_partial` should get the post-attention norm undone (`PendingNorm`), to run it inside
        its router GEMV at up to `gemv.ROUTER_NORM` tokens."""
        from crosspool.kernels import gemv

        return self.triton and self._fused_route and bool(gemv.ROUTER_NORM)

    def forward_partial(self, layer: int, x: torch.Tensor | PendingNorm) -> torch.Tensor | TopKPartials:
        """`forward`, except that an MoE layer on the Triton path without shared experts may return its
        per-expert rows before their top-k sum (`TopKPartials`): in one process the attention side sums them
        inside its residual add + RMSNorm. x may be the post-attention norm still to run (`PendingNorm`, see
        `takes_pending_norm`): a routed layer of decode size runs it inside its router GEMV, others first."""
        w = self.w.layers[layer]
        routed: tuple[torch.Tensor, torch.Tensor] | None = None
        if isinstance(x, PendingNorm):
            from crosspool.kernels import gemv

            if "router" in w and self._fused_route and x.delta.shape[0] <= min(gemv.ROUTER_NORM, gemv.MAX_GEMV_TOKENS):
                from crosspool.kernels.routing import norm_route_linear

                assert self.spec.routing is not None
                normed, x.h, weights, ids = norm_route_linear(x.delta, x.residual, x.weight, x.eps, w["router"],
                                                              self.spec.routing)
                x, routed = normed, (weights, ids)
            else:
                x = x.resolve()
        if "gate_up" in w:
            return _mlp(x, w["gate_up"], w["down"])
        has_shared = "shared_gate_up" in w        # the shared expert is added to the summed rows
        weights, ids = routed or self._route(w, x.to(w["router"].dtype))
        if self.expert_hits is not None:
            self.expert_hits[layer, ids.reshape(-1)] = 1
        if self.triton:
            from crosspool.kernels.fused_moe import fused_moe

            out = fused_moe(x, w["experts_gate_up"], w["experts_down"], weights, ids, reduce=has_shared)
        else:
            out = ref.experts(x, w["experts_gate_up"], w["experts_down"], weights, ids)
        if has_shared:
            shared = _mlp(x, w["shared_gate_up"], w["shared_down"])
            if "shared_gate" in w:
                shared = torch.sigmoid(ref.linear(x, w["shared_gate"])) * shared
            out = out + shared
        return out

    def _route(self, w: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights, expert ids) of the tokens. Triton path at decode sizes: the router's skinny GEMM, its K-split
        partials summed inside the routing kernel (`routing.route_linear`); otherwise the router GEMM, then the
        routing rule (the fused kernel for greedy rules, the torch reference for group-limited ones)."""
        routing = self.spec.routing
        assert routing is not None
        router = w["router"]
        if not self.triton:
            return ref.route(ref.linear(x, router), routing, w.get("score_bias"))
        from crosspool.kernels import gemv
        from crosspool.kernels import routing as routing_kernels

        if self._fused_route and gemv.ROUTER and gemv.applies(x, router):
            return routing_kernels.route_linear(x, router, routing)
        logits = gemv.linear(x, router, use=gemv.ROUTER)
        if self._fused_route:
            return routing_kernels.route(logits, routing)
        return ref.route(logits, routing, w.get("score_bias"))


def _mlp(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return ref.linear(ref.silu_and_mul(ref.linear(x, gate_up)), down)
