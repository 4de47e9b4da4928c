"""The megakernel's torch reference (issue 4): what the kernel computes, phase by phase (`reference`), with an
attention phase's partials, log-sum-exps and combined heads (`attend_reference`, `combine`). Runs on the CPU.
"""

from __future__ import annotations

import torch

from crosspool.kernels.megakernel.plan import BLOCK, HEAD_DIM, NO_PHASE, Phase, Step, split_positions
from crosspool.kernels.torch_ref import rms_norm


def attend_reference(ph: Phase, qkv: torch.Tensor, norms: torch.Tensor | None, eps: float, step: Step,
                     family: torch.Tensor | None = None) -> torch.Tensor:
    """An attention phase as the kernel computes it: [splits, heads, HEAD_DIM] partials (bf16-rounded), then
    [splits, heads] log-sum-exps (fp32, base 2, of the scores times scale * log2(e)), then the [heads, HEAD_DIM]
    output, the splits combined (bf16-rounded), then with a fold the [heads, fold_rows] products of `family`'s fold
    rows with each head's output (fp32); writes the new key and value into step.kv."""
    hd, dtype = ph.out_rows, step.kv.dtype
    heads, splits = hd // HEAD_DIM, ph.sources
    q, k, v = (qkv[j * hd:(j + 1) * hd].to(dtype) for j in range(3))
    if ph.norm != -1:
        assert norms is not None
        q = rms_norm(q, norms[ph.norm:ph.norm + hd].to(dtype), eps)
        k = rms_norm(k, norms[ph.norm + hd:ph.norm + 2 * hd].to(dtype), eps)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        a, b = x.float().view(heads, 2, HEAD_DIM // 2).unbind(1)
        c, s = step.cos.float().to(x.device), step.sin.float().to(x.device)
        return torch.cat([a * c - b * s, b * c + a * s], dim=1).to(dtype)

    q, k = rotate(q), rotate(k)
    pos = step.ctx - 1
    block = int(step.block_table[pos // BLOCK])
    step.kv[block, ph.row0, 0, pos % BLOCK] = k
    step.kv[block, ph.row0, 1, pos % BLOCK] = v.view(heads, HEAD_DIM)
    blocks = step.block_table[:-(-step.ctx // BLOCK)].long().to(step.kv.device)
    cached = step.kv[blocks, ph.row0].float()                       # [blocks, 2, BLOCK, heads, dim]
    keys = cached[:, 0].reshape(-1, heads, HEAD_DIM)[:step.ctx]
    values = cached[:, 1].reshape(-1, heads, HEAD_DIM)[:step.ctx]
    scores = torch.einsum("hd,thd->ht", q.float(), keys) * (ph.scale * 1.4426950408889634)
    span = split_positions(step.ctx, splits)
    out = torch.zeros(splits, heads, HEAD_DIM, device=qkv.device)
    lse = torch.full((splits, heads), float("-inf"), device=qkv.device)
    for s in range(splits):
        lo, hi = s * span, min((s + 1) * span, step.ctx)
        if lo >= hi:
            continue
        m = scores[:, lo:hi].max(dim=1, keepdim=True).values
        p = torch.exp2(scores[:, lo:hi] - m)
        out[s] = (torch.einsum("ht,thd->hd", p, values[lo:hi]) / p.sum(1, keepdim=True)).to(dtype).float()
        lse[s] = m[:, 0] + torch.log2(p.sum(1))
    parts = torch.cat([out.reshape(-1), lse.reshape(-1)])
    heads_out = combine(parts, splits, dtype)
    if ph.fold == -1:
        return torch.cat([parts, heads_out])
    assert family is not None, "an attention phase with a fold needs its family"
    w = family[ph.fold:ph.fold + ph.fold_rows].float().view(ph.fold_rows, heads, HEAD_DIM)
    folded = (w * heads_out.to(w.device).view(1, heads, HEAD_DIM)).sum(-1).t()        # [heads, fold_rows]
    return torch.cat([parts, heads_out, folded.reshape(-1).to(parts.device)])


def combine(partials: torch.Tensor, splits: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Partials and log-sum-exps (`attend_reference`'s layout) with the splits combined, rounded."""
    heads = partials.numel() // (splits * (HEAD_DIM + 1))
    out = partials[:splits * heads * HEAD_DIM].view(splits, heads, HEAD_DIM)
    lse = partials[splits * heads * HEAD_DIM:].view(splits, heads, 1)
    w = torch.exp2(lse - lse.max(0).values)
    return ((w * out).sum(0) / w.sum(0)).reshape(-1).to(dtype).float()


def reference(phases: list[Phase], families: list[torch.Tensor], x: torch.Tensor, norms: torch.Tensor | None = None,
              eps: float = 1e-5, given: list[torch.Tensor] | None = None, step: Step | None = None
              ) -> list[torch.Tensor]:
    """Every phase's outputs, as the kernel computes them: each input vector rounded to the weights' dtype (the
    kernel stages it in shared memory so), products and sums in fp32, each output rounded to bf16 (two go in a
    word). With `given` (say the kernel's own outputs), each phase reads its inputs, residual and router from
    those instead: every phase is then checked on its own, to one rounding, with no earlier rounding carried on.
    An attention phase's outputs are its partials, log-sum-exps and combined heads (`attend_reference`); it writes
    into step.kv."""
    outs: list[torch.Tensor] = []
    x = x.float()

    def vec(src: int) -> torch.Tensor:
        return x if src == -1 else (given[src].float() if given is not None else outs[src])

    for ph in phases:
        if ph.kind == "attention":
            assert step is not None, "an attention phase needs the step (KV cache, block table, position)"
            outs.append(attend_reference(ph, vec(ph.input), norms, eps, step,
                                         families[ph.family] if ph.fold != -1 else None))
            continue
        if ph.kind == "heads":                # the fold's products summed head by head, in order
            att = phases[ph.input]
            heads = att.out_rows // HEAD_DIM
            v = vec(ph.input)
            folded = v[v.numel() - heads * ph.out_rows:].view(heads, ph.out_rows)
            y = torch.zeros(ph.out_rows, dtype=torch.float32, device=v.device)
            for h in range(heads):
                y = y + folded[h]
            if ph.residual != NO_PHASE:
                y = y + vec(ph.residual)[:ph.out_rows].to(y.device)
            outs.append(y.to(torch.bfloat16).float())
            continue
        w = families[ph.family]
        if ph.input >= 0 and phases[ph.input].kind == "attention":
            att = phases[ph.input]
            v = vec(ph.input)
            end = v.numel() - (att.out_rows // HEAD_DIM) * att.fold_rows
            inp = v[end - att.out_rows:end].to(w.dtype)                        # the combined heads
        else:
            inp = vec(ph.input).to(w.dtype)
        if ph.norm != -1:
            assert norms is not None
            n = ph.k if ph.kind == "swiglu" else ph.k * ph.sources
            inp = rms_norm(inp[:n], norms[ph.norm:ph.norm + n].to(w.dtype), eps)
        inp = inp.float()
        experts, gates = list(range(ph.sources)), [1.0] * ph.sources
        if ph.route != NO_PHASE:            # `torch_ref.route`'s rule, with the kernel's tie-break: lower id first
            logits = vec(ph.route).float()
            rms_of = phases[ph.route].rms_of
            if rms_of != NO_PHASE:           # a folded router's outputs are the logits times rms_of's RMS
                logits = logits * torch.rsqrt(vec(rms_of).float().pow(2).mean() + eps)
            probs = torch.softmax(logits, dim=0)
            ids = torch.sort(probs, descending=True, stable=True).indices[:ph.sources]
            experts, gates = ids.tolist(), probs[ids].tolist()
        if ph.kind == "sum":
            y = torch.zeros(ph.out_rows, dtype=torch.float32, device=w.device)
            for s, (e, gate) in enumerate(zip(experts, gates, strict=True)):
                rows = w[ph.row0 + e * ph.stride: ph.row0 + e * ph.stride + ph.out_rows].float()
                y += gate * (rows @ inp[s * ph.k:(s + 1) * ph.k])
        else:
            per = ph.out_rows // ph.sources
            parts = []
            for e in experts:
                g0 = ph.row0 + e * ph.stride
                gate = w[g0:g0 + per].float() @ inp[:ph.k]
                up = w[g0 + ph.up_offset:g0 + ph.up_offset + per].float() @ inp[:ph.k]
                parts.append(torch.nn.functional.silu(gate) * up)
            y = torch.cat(parts)
        if ph.residual != NO_PHASE:
            y = y + vec(ph.residual)[:ph.out_rows]
        outs.append(y.to(w.dtype).float())        # a word carries two bf16 values
    return outs
