"""The HTTP API: OpenAI-compatible completions and chat for every served model (chosen by `model`),
streaming as SSE, /v1/models, /health, /metrics, and admin endpoints to add and remove models at runtime.

Every bad input gets OpenAI's error schema and a status: unknown model 404, invalid values or a prompt
past the context 400 (with the numbers), overload 503, missing/wrong API key 401, admin without a key 403.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from crosspool.engine.engine import RequestError
from crosspool.engine.output import RequestOutput
from crosspool.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    chat_logprobs,
    completion_logprobs,
    error_body,
    new_id,
    now,
    usage,
)
from crosspool.server.runtime import EngineDead, EngineRuntime, Overloaded, ShuttingDown

log = logging.getLogger("crosspool.server")


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


class AddModel(BaseModel):
    name: str
    path: str


def build_app(runtime: EngineRuntime, api_key: str | None = None, shutdown_timeout_s: float = 30.0) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        log.info("shutting down: draining in-flight requests", extra={"in_flight": runtime.in_flight})
        await runtime.shutdown(shutdown_timeout_s)

    app = FastAPI(title="CrossPool", lifespan=lifespan)
    app.state.runtime = runtime

    def check_key(request: Request, required: bool) -> None:
        if api_key is None:
            if required:
                raise APIError(403, "admin endpoints need the server started with --api-key", "permission_error")
            return
        auth = request.headers.get("authorization", "")
        if not (auth.startswith("Bearer ") and secrets.compare_digest(auth[7:], api_key)):
            raise APIError(401, "missing or invalid API key (Authorization: Bearer <key>)", "authentication_error")

    def user_auth(request: Request) -> None:
        check_key(request, required=False)

    def admin_auth(request: Request) -> None:
        check_key(request, required=True)

    # ---- errors -------------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(error_body(exc.message, exc.kind, exc.param, exc.status), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        msg = f"{where}: {first.get('msg')}" if where else str(first.get("msg", "invalid request body"))
        if first.get("type") == "json_invalid":
            msg, where = f"malformed JSON body: {first.get('ctx', {}).get('error', '')}".strip(), None
        return JSONResponse(error_body(msg, param=where, code=400), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error", code=exc.status_code),
                            status_code=exc.status_code)

    # ---- info ---------------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> JSONResponse:
        if not runtime.alive:
            return JSONResponse({"status": "dead", "error": repr(runtime.error)}, status_code=503)
        return JSONResponse({"status": "ok", "models": runtime.model_names(), "in_flight": runtime.in_flight})

    @app.get("/metrics", dependencies=[Depends(user_auth)])
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(runtime.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=[Depends(user_auth)])
    async def models() -> dict:
        created = now()
        return {"object": "list", "data": [{"id": m, "object": "model", "created": created, "owned_by": "crosspool"}
                                           for m in runtime.model_names()]}

    # ---- generation ---------------------------------------------------------------------------
    def served(model: str) -> Any:
        m = runtime.engine.models.get(model)
        if m is None:
            raise APIError(404, f"The model `{model}` does not exist; serving {runtime.model_names()}",
                           "not_found_error", "model")
        return m

    async def start(req: Any, prompt: str | list[int], max_tokens: int, logprobs: int | None) -> list:
        """Admit all n choices of one prompt; returns [(prompt tokens, outputs), ...]."""
        started = []
        try:
            for i in range(req.n):
                try:
                    params = req.sampling_params(max_tokens, logprobs, i)
                except ValueError as exc:
                    raise APIError(400, str(exc)) from exc
                started.append(await runtime.submit(req.model, prompt, params, new_id("req")))
        except RequestError as exc:
            for _, stream in started:
                await stream.aclose()
            raise APIError(400, str(exc)) from exc
        except Overloaded as exc:
            raise APIError(503, str(exc), "server_overloaded") from exc
        except (ShuttingDown, EngineDead) as exc:
            raise APIError(503, str(exc), "service_unavailable") from exc
        return started

    def max_tokens_for(m: Any, n_prompt_hint: int, asked: int | None) -> int:
        if asked is not None:
            if asked < 1:
                raise APIError(400, f"max_tokens must be >= 1, got {asked}", param="max_tokens")
            return asked
        return max(1, m.max_model_len - n_prompt_hint)   # like vLLM: fill the context when unset

    @app.post("/v1/completions", dependencies=[Depends(user_auth)])
    async def completions(req: CompletionRequest, request: Request) -> Any:
        m = served(req.model)
        if req.echo:
            raise APIError(400, "echo is not supported", param="echo")
        prompts = _prompt_list(req.prompt)
        choices: list = []
        for prompt in prompts:
            n_hint = len(prompt) if isinstance(prompt, list) else len(m.tokenizer(prompt).input_ids)
            choices += await start(req, prompt, max_tokens_for(m, n_hint, req.max_tokens), req.logprobs)
        rid, created = new_id("cmpl"), now()
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(i: int, out: RequestOutput, text: str, start_tok: int, first: bool) -> dict:
            return {"id": rid, "object": "text_completion", "created": created, "model": req.model,
                    "choices": [{"index": i, "text": text, "finish_reason": out.finish_reason if out.finished else None,
                                 "logprobs": completion_logprobs(out, start_tok, m.tokenizer)}]}

        if req.stream:
            return _sse(choices, chunk, include_usage, req.n, rid, created, req.model, "text_completion")
        outs = await _collect(request, choices)
        body_choices = [{"index": i, "text": o.text, "finish_reason": o.finish_reason,
                         "logprobs": completion_logprobs(o, 0, m.tokenizer)} for i, o in enumerate(outs)]
        return {"id": rid, "object": "text_completion", "created": created, "model": req.model,
                "choices": body_choices, "usage": _usage(choices, outs, req.n)}

    @app.post("/v1/chat/completions", dependencies=[Depends(user_auth)])
    async def chat(req: ChatCompletionRequest, request: Request) -> Any:
        m = served(req.model)
        try:
            messages = [{"role": msg.role, "content": msg.text()} for msg in req.messages]
            ids = m.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                  return_dict=False)
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages") from exc
        except Exception as exc:   # a template that rejects the conversation (e.g. roles out of order)
            raise APIError(400, f"chat template failed: {exc}", param="messages") from exc
        asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        if req.top_logprobs and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        choices = await start(req, list(ids), max_tokens_for(m, len(ids), asked), logprobs)
        rid, created = new_id("chatcmpl"), now()
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(i: int, out: RequestOutput, text: str, start_tok: int, first: bool) -> dict:
            delta = {"role": "assistant", "content": text} if first else {"content": text}
            reason = out.finish_reason if out.finished else None
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": req.model,
                    "choices": [{"index": i, "delta": delta, "finish_reason": reason,
                                 "logprobs": chat_logprobs(out, start_tok, m.tokenizer)}]}

        if req.stream:
            return _sse(choices, chunk, include_usage, req.n, rid, created, req.model, "chat.completion.chunk")
        outs = await _collect(request, choices)
        body_choices = [{"index": i, "message": {"role": "assistant", "content": o.text},
                         "finish_reason": o.finish_reason, "logprobs": chat_logprobs(o, 0, m.tokenizer)}
                        for i, o in enumerate(outs)]
        return {"id": rid, "object": "chat.completion", "created": created, "model": req.model,
                "choices": body_choices, "usage": _usage(choices, outs, req.n)}

    # ---- admin --------------------------------------------------------------------------------
    @app.post("/v1/admin/models", dependencies=[Depends(admin_auth)], status_code=201)
    async def add_model(body: AddModel) -> dict:
        if body.name in runtime.engine.models:
            raise APIError(409, f"a model named {body.name!r} is already served", param="name")
        if not (Path(body.path) / "config.json").is_file():
            raise APIError(400, f"{body.path}: not a checkpoint directory (no config.json)", param="path")
        log.info("loading model", extra={"model": body.name, "path": body.path})
        try:
            prepared = await asyncio.to_thread(runtime.engine.prepare_model, body.name, body.path)
            await runtime.run(lambda: runtime.engine.attach_model(prepared))
        except (ValueError, NotImplementedError) as exc:
            raise APIError(400, str(exc)) from exc
        log.info("model ready", extra={"model": body.name})
        return {"id": body.name, "object": "model", "status": "ready"}

    @app.delete("/v1/admin/models/{name}", dependencies=[Depends(admin_auth)])
    async def remove_model(name: str, drain: bool = True, timeout_s: float = 300.0) -> dict:
        if name not in runtime.engine.models:
            raise APIError(404, f"The model `{name}` does not exist", "not_found_error", "name")
        await runtime.run(lambda: runtime.engine.drain_model(name))
        if not drain:
            for rid in await runtime.run(lambda: runtime.engine.abort_model(name)):
                runtime.abort(rid)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while await runtime.run(lambda: runtime.engine.models[name].scheduler.has_work()):
            if loop.time() > deadline:
                for rid in await runtime.run(lambda: runtime.engine.abort_model(name)):
                    runtime.abort(rid)
            await asyncio.sleep(0.05)
        await runtime.run(lambda: runtime.engine.remove_model(name))
        log.info("model removed", extra={"model": name})
        return {"id": name, "object": "model", "deleted": True}

    return app


# ------------------------------------------------------------------------------------------------

def _prompt_list(prompt: Any) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    if not prompt:
        raise APIError(400, "prompt must not be empty", param="prompt")
    return list(prompt)


def _prompt_tokens(choices: list, n: int) -> int:
    """Prompt tokens of a request: each prompt once, whatever the number of choices per prompt."""
    return sum(tokens for tokens, _ in choices[::n])


def _usage(choices: list, outs: list[RequestOutput], n: int) -> dict[str, int]:
    return usage(_prompt_tokens(choices, n), sum(len(o.token_ids) for o in outs))


async def _collect(request: Request, choices: list) -> list[RequestOutput]:
    """Final outputs of every choice; aborts all of them if the client disconnects first."""

    async def last(stream: AsyncIterator[RequestOutput]) -> RequestOutput:
        final = None
        async for out in stream:
            final = out
        return final

    tasks = [asyncio.create_task(last(stream)) for _, stream in choices]
    try:
        while not all(t.done() for t in tasks):
            await asyncio.wait(tasks, timeout=0.1)
            if await request.is_disconnected():
                raise asyncio.CancelledError
        return [t.result() for t in tasks]
    finally:
        await _close(tasks, choices)


async def _close(tasks: list[asyncio.Task], choices: list) -> None:
    """Stop the tasks reading the choices' outputs, then close the outputs: a request whose outputs are
    closed before it finished is aborted (its KV freed before the next engine step)."""
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for _, stream in choices:
        await stream.aclose()


def _sse(choices: list, chunk, include_usage: bool, n: int, rid: str, created: int,  # noqa: ANN001
         model: str, obj: str) -> StreamingResponse:
    """SSE stream of every choice's deltas, then the usage chunk (when asked) and `data: [DONE]`. When
    the client disconnects Starlette cancels the generator, whose cleanup aborts the requests."""
    async def merged() -> AsyncIterator[tuple[int, RequestOutput]]:
        q: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, stream: AsyncIterator[RequestOutput]) -> None:
            async for out in stream:
                await q.put((i, out))
            await q.put((i, None))

        tasks = [asyncio.create_task(pump(i, s)) for i, (_, s) in enumerate(choices)]
        done = 0
        try:
            while done < len(tasks):
                i, out = await q.get()
                if out is None:
                    done += 1
                else:
                    yield i, out
        finally:
            await _close(tasks, choices)

    async def events() -> AsyncIterator[str]:
        sent_tokens = [0] * len(choices)
        sent_any = [False] * len(choices)
        finals: dict[int, RequestOutput] = {}
        async for i, out in merged():
            if out.new_text or out.finished:
                yield f"data: {json.dumps(chunk(i, out, out.new_text, sent_tokens[i], not sent_any[i]))}\n\n"
                sent_tokens[i], sent_any[i] = len(out.token_ids), True
            if out.finished:
                finals[i] = out
        if include_usage:
            body = {"id": rid, "object": obj, "created": created, "model": model, "choices": [],
                    "usage": _usage(choices, list(finals.values()), n)}
            yield f"data: {json.dumps(body)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")
