"""The OpenAI-compatible HTTP API of `loratune serve`, on FastAPI: /v1/models, /v1/chat/completions, /v1/completions.

Every mistake in a request is the client's to fix, so it gets OpenAI's error shape with a 4xx code and the server
carries on: unknown model 404, bad JSON or fields 400, missing key 401, body too large 413, queue full 503 with
Retry-After.
"""

from __future__ import annotations

import asyncio
import functools
import json
import secrets
import time
import uuid
from typing import Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from ..inference.generate import chat_prompt_ids
from .engine import Busy, Engine, Sequence
from .models import Served


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]


class Sampling(BaseModel):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: dict | None = None


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(Sampling):
    prompt: str | list[str]


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    kind = {401: "authentication_error", 404: "not_found_error", 503: "server_busy"}.get(status, "invalid_request_error")
    body = {"error": {"message": message, "type": kind if status < 500 or status == 503 else "server_error",
                      "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def create_app(served: Served, engine: Engine, api_key: str | None = None, max_tokens_limit: int = 2048,
               max_body: int = 1 << 20) -> FastAPI:
    def check_key(request: Request) -> None:
        given = request.headers.get("authorization", "")
        if api_key is not None and not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    app = FastAPI(title="loratune serve", docs_url=None, redoc_url=None, openapi_url=None,
                  dependencies=[Depends(check_key)])
    app.add_middleware(BodyLimit, limit=max_body)
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return error_response(e.status, e.message, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        if first.get("type") == "json_invalid":
            return error_response(400, "the request body is not valid JSON", code="invalid_json")
        return error_response(400, f"{where or 'body'}: {first.get('msg')}", param=where, code="invalid_value")

    @app.exception_handler(HTTPException)
    async def _http(request: Request, e: HTTPException):
        return error_response(e.status_code, str(e.detail))

    @app.get("/health")
    async def health():
        running = len(engine.batch.rows) if engine.batch else 0
        return {"status": "ok", "running": running, "waiting": len(engine.waiting), "steps": engine.steps}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "loratune",
             "parent": None if name == served.base else served.base} for name in served.adapters]}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        tok = tokenizer_of(served, body.model)
        messages = [{"role": "system" if m.role == "developer" else m.role,
                     "content": m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)}
                    for m in body.messages]
        prompt = chat_prompt_ids(tok, None, messages)
        limit = body.max_completion_tokens or body.max_tokens
        return await respond(request, body, [prompt], limit, "chat.completion")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        tok = tokenizer_of(served, body.model)
        texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not texts:
            raise ApiError(400, "prompt: give a string or a list of strings", "prompt")
        prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        return await respond(request, body, prompts, body.max_tokens or 16, "text_completion")

    async def respond(request: Request, body: Sampling, prompts: list[list[int]], limit: int | None, kind: str):
        stops = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        if len(stops) > 4 or any(not s for s in stops):
            raise ApiError(400, "stop: at most 4 non-empty strings", "stop")
        if limit is not None and limit > max_tokens_limit:
            raise ApiError(400, f"max_tokens: {limit} is over this server's limit of {max_tokens_limit}", "max_tokens")
        longest = max(len(p) for p in prompts)
        if longest + (limit or 1) > served.context:
            raise ApiError(400, f"this model's context is {served.context} tokens; the prompt has {longest} and "
                           f"max_tokens asks for {limit or 1} more", "messages" if kind == "chat.completion" else "prompt",
                           "context_length_exceeded")
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def post(index: int, text: str, finish: str | None) -> None:  # called from the engine's thread
            loop.call_soon_threadsafe(events.put_nowait, (index, text, finish))

        seqs = []
        for p, prompt in enumerate(prompts):
            for i in range(body.n):
                index = p * body.n + i
                seqs.append(Sequence(served.adapters[body.model], prompt,
                                     min(limit or max_tokens_limit, served.context - len(prompt)),
                                     served.tokenizers[body.model], functools.partial(post, index), body.temperature, body.top_p, stops,
                                     None if body.seed is None else body.seed + index))
        try:
            engine.submit(seqs)
        except Busy as e:
            raise ApiError(503, str(e), code="server_busy", headers={"Retry-After": "1"}) from None
        usage = {"prompt_tokens": sum(len(p) for p in prompts)}
        reply = Reply(kind, body.model, f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex}")
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(reply.stream(events, seqs, usage, include_usage), media_type="text/event-stream")
        return await reply.whole(request, events, seqs, usage)

    return app


def tokenizer_of(served: Served, model: str):
    if model not in served.tokenizers:
        raise ApiError(404, f"model '{model}' is not served here; GET /v1/models lists: "
                       f"{', '.join(served.tokenizers)}", "model", "model_not_found")
    return served.tokenizers[model]


class Reply:
    """Turns the engine's events into OpenAI's response objects, whole or as server-sent events."""

    def __init__(self, kind: str, model: str, id_: str):
        self.kind, self.model, self.id, self.created = kind, model, id_, int(time.time())

    def choice(self, index: int, text: str, finish: str | None, delta: bool = False, first: bool = False) -> dict:
        if self.kind == "text_completion":
            return {"index": index, "text": text, "finish_reason": finish, "logprobs": None}
        message = {"role": "assistant", "content": text} if not delta or first else {"content": text}
        return {"index": index, "delta" if delta else "message": message, "finish_reason": finish}

    def envelope(self, choices: list[dict], usage: dict | None = None, chunk: bool = False) -> dict:
        kind = self.kind + (".chunk" if chunk and self.kind == "chat.completion" else "")
        out = {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}
        if usage is not None:
            out["usage"] = usage
        return out

    async def whole(self, request: Request, events: asyncio.Queue, seqs: list[Sequence], usage: dict) -> dict:
        texts, finishes = [""] * len(seqs), [None] * len(seqs)
        try:
            while any(f is None for f in finishes):
                try:
                    index, text, finish = await asyncio.wait_for(events.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return {}
                    continue
                texts[index] += text
                finishes[index] = finish
        finally:
            cancel(seqs)
        if "error" in finishes:
            raise ApiError(500, texts[finishes.index("error")], code="generation_failed")
        return self.envelope([self.choice(i, t, f) for i, (t, f) in enumerate(zip(texts, finishes))],
                             completed(usage, seqs))

    async def stream(self, events: asyncio.Queue, seqs: list[Sequence], usage: dict, include_usage: bool):
        left, started = len(seqs), set()
        try:
            while left:
                index, text, finish = await events.get()
                left -= finish is not None
                chunk = self.envelope([self.choice(index, text, finish, delta=True, first=index not in started)],
                                      chunk=True)
                started.add(index)
                yield f"data: {json.dumps(chunk)}\n\n"
            if include_usage:
                yield f"data: {json.dumps(self.envelope([], completed(usage, seqs), chunk=True))}\n\n"
            yield "data: [DONE]\n\n"
        finally:  # the client went away (or we are done): free the rows
            cancel(seqs)


def cancel(seqs: list[Sequence]) -> None:
    for s in seqs:
        s.cancelled = True


def completed(usage: dict, seqs: list[Sequence]) -> dict:
    tokens = sum(len(s.tokens) for s in seqs)
    return {**usage, "completion_tokens": tokens, "total_tokens": usage["prompt_tokens"] + tokens}


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is answered 413 before the app parses any of it."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                response = error_response(413, f"the request body is over {self.limit} bytes", code="too_large")
                return await response(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)
