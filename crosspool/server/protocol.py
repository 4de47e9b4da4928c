"""OpenAI-compatible request and response bodies (pydantic), and their mapping to SamplingParams."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from crosspool.engine.output import RequestOutput
from crosspool.engine.sampling import SamplingParams


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False
    user: str | None = None

    def sampling_params(self, max_tokens: int, logprobs: int | None, index: int) -> SamplingParams:
        """Raises ValueError with the offending field for values out of range."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        # n > 1 with a seed: each choice gets its own deterministic stream
        seed = None if self.seed is None else self.seed + index
        return SamplingParams(
            max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, seed=seed,
            stop=stop, stop_token_ids=list(self.stop_token_ids or []), ignore_eos=self.ignore_eos,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty, logprobs=logprobs,
        )


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):   # content parts: only text parts are supported
            parts = []
            for part in self.content:
                if part.get("type") != "text":
                    raise ValueError(f"unsupported content part type {part.get('type')!r} (only 'text')")
                parts.append(str(part.get("text", "")))
            return "".join(parts)
        return self.content or ""


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_logprobs(out: RequestOutput, start: int, tokenizer) -> dict | None:  # noqa: ANN001
    """OpenAI completions `logprobs` object for output tokens [start:]."""
    if out.logprobs is None:
        return None
    items = out.logprobs[start:]
    return {
        "tokens": [tokenizer.decode([lp.token_id]) for lp in items],
        "token_logprobs": [lp.logprob for lp in items],
        "top_logprobs": [{tokenizer.decode([t]): v for t, v in lp.top} for lp in items],
        "text_offset": [],
    }


def chat_logprobs(out: RequestOutput, start: int, tokenizer) -> dict | None:  # noqa: ANN001
    """OpenAI chat `logprobs` object ({"content": [...]}) for output tokens [start:]."""
    if out.logprobs is None:
        return None

    def entry(token_id: int, logprob: float) -> dict:
        text = tokenizer.decode([token_id])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                        for lp in out.logprobs[start:]]}


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: int | str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
