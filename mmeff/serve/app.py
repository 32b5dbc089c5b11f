"""`mmeff serve CKPT`: an OpenAI-compatible HTTP server (completions, chat completions, SSE streaming) for an LM.

Built on FastAPI + uvicorn: the maintained, widely used ASGI stack (Starlette's streaming responses
carry the server-sent events; uvicorn is its standard server). LitServe was the other candidate; its
batching collects a batch over a time window and runs it to the end, while here requests join and
leave one running decoding loop (`mmeff.serve.engine`), so only the HTTP layer is taken from a library.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from mmeff.generate import USER
from mmeff.serve.api import APIError, ChatRequest, CompletionRequest, _Body, check_lengths, parse
from mmeff.serve.engine import Engine, Handle, Result

log = logging.getLogger("mmeff")
POLL_SECONDS = 0.1  # how often a waiting request checks that its client is still there


def _usage(r: Result) -> dict:
    return {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens, "total_tokens": r.prompt_tokens + r.completion_tokens}


class _Call:
    """One request in flight: its engine handle and the events (text pieces, then the result) it receives."""

    def __init__(self, engine: Engine, request: Request, ids: list[int], body: _Body, max_new: int, extra_stop: list[str]) -> None:
        self.request = request
        self.events: asyncio.Queue[tuple[str, object]] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def put(kind: str) -> Callable[[object], None]:
            return lambda item: loop.call_soon_threadsafe(self.events.put_nowait, (kind, item))

        self.handle: Handle = engine.submit(ids, body.sampling(max_new, extra_stop), put("text"), put("done"))

    async def next(self) -> tuple[str, object] | None:
        """The next event, or None once the client has gone (the request is then cancelled)."""
        while True:
            try:
                event = await asyncio.wait_for(self.events.get(), timeout=POLL_SECONDS)
            except asyncio.TimeoutError:
                event = None
            if await self.request.is_disconnected():
                self.handle.cancel()
                return None
            if event is not None:
                return event


def create_app(engine: Engine, name: str, context: int) -> FastAPI:
    """The FastAPI app serving `engine`'s model as `name` with a context of `context` tokens (prompt + reply)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="mmeff", lifespan=lifespan)
    tokenizer = engine.tokenizer

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("serve: request failed")
        return JSONResponse(APIError(500, f"{type(exc).__name__}: {exc}", None, "server_error").body(), status_code=500)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": name, "running": engine.running, "waiting": engine.waiting}

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": name, "object": "model", "created": 0, "owned_by": "mmeff", "max_model_len": context}
        return {"object": "list", "data": [card]}

    async def serve(request: Request, body: _Body, chat: bool) -> JSONResponse | StreamingResponse:
        if body.model is not None and body.model != name:
            raise APIError(404, f"model {body.model!r} is not served here; this server serves {name!r}", "model", "model_not_found")
        field = "messages" if chat else "prompt"
        ids = tokenizer.encode(body.text())
        max_new = check_lengths(len(ids), body.max_tokens, context, field)
        call = _Call(engine, request, ids, body, max_new, [f"\n{USER}"] if chat else [])
        rid, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "created": created, "model": name}
        if body.stream:
            return StreamingResponse(_stream(call, head, chat), media_type="text/event-stream")
        pieces = []
        while (event := await call.next()) is not None:
            kind, item = event
            if kind == "text":
                pieces.append(item)
                continue
            if item.finish_reason == "error":
                raise APIError(500, f"generation failed: {item.error}", None, "server_error")
            text = "".join(pieces)
            choice = {"index": 0, "finish_reason": item.finish_reason}
            if chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice.update(text=text, logprobs=None)
            kind_name = "chat.completion" if chat else "text_completion"
            return JSONResponse({**head, "object": kind_name, "choices": [choice], "usage": _usage(item)})
        return JSONResponse({"error": {"message": "client disconnected"}}, status_code=499)

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> JSONResponse | StreamingResponse:
        return await serve(request, parse(await request.body(), CompletionRequest), chat=False)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> JSONResponse | StreamingResponse:
        return await serve(request, parse(await request.body(), ChatRequest), chat=True)

    return app


async def _stream(call: _Call, head: dict, chat: bool) -> AsyncIterator[str]:
    """Server-sent events: one chunk per piece of final text, a last chunk with finish_reason and usage, [DONE]."""
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(piece: str | None, finish: str | None = None, **more: object) -> str:
        if chat:
            choice = {"index": 0, "delta": {} if piece is None else {"content": piece}, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": piece or "", "logprobs": None, "finish_reason": finish}
        return f"data: {json.dumps({**head, 'object': kind, 'choices': [choice], **more})}\n\n"

    try:
        if chat:
            yield f"data: {json.dumps({**head, 'object': kind, 'choices': [{'index': 0, 'delta': {'role': 'assistant'}, 'finish_reason': None}]})}\n\n"
        while (event := await call.next()) is not None:
            kind_, item = event
            if kind_ == "text":
                yield chunk(item)
                continue
            if item.finish_reason == "error":
                yield f"data: {json.dumps(APIError(500, f'generation failed: {item.error}', None, 'server_error').body())}\n\n"
            else:
                yield chunk(None, item.finish_reason, usage=_usage(item))
            yield "data: [DONE]\n\n"
            return
    finally:
        call.handle.cancel()  # a no-op when finished; frees the slot when the client went away mid-stream


def run_serve(args: argparse.Namespace) -> int:
    """`mmeff serve CKPT [--host H] [--port P]`: serve an LM checkpoint until interrupted."""
    import uvicorn

    from mmeff import checkpoint
    from mmeff.checkpoint import load_lm

    model, tokenizer = load_lm(args.ckpt)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device)
    context = args.context or checkpoint.load_config(args.ckpt).encoder.seq_len
    name = args.name or Path(args.ckpt).resolve().name
    app = create_app(Engine(model, tokenizer, max_batch=args.max_batch), name, context)
    log.info("serving %s (%s, context %d tokens) on http://%s:%d/v1", name, device, context, args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
