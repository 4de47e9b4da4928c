"""RequestOutput and the text side of a sequence: incremental detokenization and stop conditions."""

from __future__ import annotations

from dataclasses import dataclass

from crosspool.engine.sequence import Sequence


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    model: str
    prompt: str
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    new_text: str                 # text added since the previous output of this request (streaming)
    finished: bool
    finish_reason: str | None     # "stop" | "length" | None
    ttft_s: float | None
    tbt_s: list[float]
    queue_s: float | None
    num_preemptions: int

    @staticmethod
    def of(seq: Sequence, new_text: str) -> RequestOutput:
        m = seq.metrics
        return RequestOutput(
            seq.request_id, seq.model, seq.prompt, list(seq.prompt_token_ids), seq.text,
            list(seq.output_token_ids), new_text, seq.finished, seq.finish_reason, m.ttft_s, m.tbt_s,
            m.queue_s, m.num_preemptions,
        )


def update_text(seq: Sequence, tokenizer, eos_ids: set[int], max_model_len: int) -> str:  # noqa: ANN001
    """Refresh seq.text after a new token, apply stop conditions; returns the newly visible text.
    Sets seq.finish_reason when the sequence must stop (the caller finishes it)."""
    p = seq.params
    token = seq.output_token_ids[-1]
    before = seq.text
    full = tokenizer.decode(seq.output_token_ids, skip_special_tokens=True)
    # hold back a trailing partial UTF-8 character until the next token completes it
    visible = full.rstrip("\ufffd")
    if token in p.stop_token_ids or (not p.ignore_eos and token in eos_ids):
        seq.finish_reason = "stop"
    for stop in p.stop:
        # search only where the new text could have completed a stop string
        at = visible.find(stop, max(0, len(before) - len(stop) + 1))
        if at != -1:
            visible = visible[:at]
            seq.finish_reason = "stop"
            break
    if seq.finish_reason is None and (len(seq.output_token_ids) >= p.max_tokens or seq.num_tokens >= max_model_len):
        seq.finish_reason = "length"
    if seq.finish_reason is not None and not p.stop:
        visible = full
    seq.text = visible
    return visible[len(before):] if visible.startswith(before) else visible
