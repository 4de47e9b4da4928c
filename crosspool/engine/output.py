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
    logprobs: list | None = None  # TokenLogprob per output token, when the request asked for them

    @staticmethod
    def of(seq: Sequence, new_text: str) -> RequestOutput:
        m = seq.metrics
        return RequestOutput(
            seq.request_id, seq.model, seq.prompt, list(seq.prompt_token_ids), seq.text,
            list(seq.output_token_ids), new_text, seq.finished, seq.finish_reason, m.ttft_s, list(m.tbt_s),
            m.queue_s, m.num_preemptions, list(seq.logprobs) if seq.params.logprobs is not None else None,
        )


def update_text(seq: Sequence, tokenizer, eos_ids: set[int], max_model_len: int) -> str:  # noqa: ANN001
    """Refresh seq.text after a new token, apply stop conditions; returns the newly visible text.
    Sets seq.finish_reason when the sequence must stop (the caller finishes it).

    seq.text is what has been streamed so far, and it only ever grows: a trailing partial UTF-8
    character is held back until a later token completes it, and with stop strings the last
    (longest stop - 1) characters are held back too, since they may turn out to start a stop string."""
    p = seq.params
    token = seq.output_token_ids[-1]
    before = seq.text
    visible = _decode_incremental(seq, tokenizer)
    if token in p.stop_token_ids or (not p.ignore_eos and token in eos_ids):
        seq.finish_reason = "stop"
    # only an occurrence ending in text this token added can be new; the earliest one wins
    stop_at = min(
        (at for stop in p.stop if (at := visible.find(stop, max(0, len(before) - len(stop) + 1))) != -1),
        default=-1,
    )
    if stop_at != -1:
        text = visible[:stop_at]
        seq.finish_reason = "stop"
    else:
        if seq.finish_reason is None and (len(seq.output_token_ids) >= p.max_tokens
                                          or seq.num_tokens - seq.pending >= max_model_len):
            seq.finish_reason = "length"
        if seq.finish_reason is not None:
            text = _decode(tokenizer, seq.output_token_ids)    # once, with any trailing partial character
        else:
            hold = max((len(stop) for stop in p.stop), default=1) - 1
            text = visible[: max(len(before), len(visible) - hold)]
    seq.text = text
    return text[len(before):] if text.startswith(before) else text


def _decode(tokenizer, ids: list[int]) -> str:  # noqa: ANN001
    # the backend (tokenizers) directly when transformers would add nothing: ~2x less overhead per call
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return backend.decode(ids, skip_special_tokens=True)
    return tokenizer.decode(ids, skip_special_tokens=True)


def _decode_incremental(seq: Sequence, tokenizer) -> str:  # noqa: ANN001
    """Text of the output so far, up to its last complete character, decoding only a short window of
    tokens per call (the cost stays flat as the output grows)."""
    ids = seq.output_token_ids
    prefix = _decode(tokenizer, ids[seq.prefix_offset:seq.read_offset])
    window = _decode(tokenizer, ids[seq.prefix_offset:])
    if len(window) > len(prefix) and not window.endswith("\ufffd"):
        seq.decoded += window[len(prefix):]
        seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)
    return seq.decoded
