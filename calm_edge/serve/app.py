"""The FastAPI application of `calm-edge serve`, and `serve()`, which runs it under uvicorn.

Why FastAPI on uvicorn: it is what the servers users already run are built on (vLLM,
TensorRT-LLM's trtllm-serve, SGLang), its request bodies are pydantic models validated at the
boundary, and server-sent events are a streaming response. The engine steps in its own thread
(worker.py); the handlers only validate, tokenize, and relay text.

Limits, each refused before the request is queued: a body over `max_body_bytes` (413), a body
that is not JSON or not UTF-8 (400), a prompt that does not fit the context or `max_tokens`
beyond it (400), a full queue (429 with Retry-After), a server shutting down (503).
"""
import asyncio
import contextlib
import json
import secrets
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from calm_edge.runtime.engine import Engine
from calm_edge.runtime.generator import GeneratorParams
from calm_edge.runtime.text_generation import TextTracker
from calm_edge.serve import protocol
from calm_edge.serve.metrics import Metrics
from calm_edge.serve.worker import EngineWorker, Job, QueueFull, ShuttingDown

MAX_BODY_BYTES = 1 << 20  # 1 MiB: a prompt longer than any context the models have, many times over


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is answered 413 without reading the rest."""

    def __init__(self, app, limit):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await _too_large(self.limit, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _BodyTooLarge()
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _BodyTooLarge:
            await _too_large(self.limit, send)


class CountRequests:
    """ASGI middleware: counts every response by path and status in the metrics.

    Plain ASGI rather than FastAPI's `@app.middleware("http")`: that one relays a streaming
    response through a stream and a task of its own, a cost paid on every server-sent event.
    """

    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counted_send(message):
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(scope["path"], str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counted_send)


class _BodyTooLarge(Exception):
    pass


async def _too_large(limit, send):
    body = json.dumps(protocol.error_body(f"the request body is over {limit} bytes; send a shorter prompt",
                                          code="request_too_large")).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _error(status, body, headers=None):
    return JSONResponse(body, status_code=status, headers=headers)


def create_app(model, max_batch=16, max_queue=256, batching="continuous", request_timeout=None,
               shutdown_timeout=30.0, model_name=None, max_body_bytes=MAX_BODY_BYTES):
    """The application serving `model` (a runtime `Model`); the engine thread runs while the app does."""
    name = model_name or model.path.name
    metrics = Metrics(max_batch)
    worker = EngineWorker(Engine(model, max_batch=max_batch, batching=batching), metrics, max_queue=max_queue)
    K = model.chunk_size

    @contextlib.asynccontextmanager
    async def lifespan(app):
        worker.start()
        yield
        await asyncio.get_running_loop().run_in_executor(None, worker.stop, shutdown_timeout)

    app = FastAPI(title="calm-edge", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.worker, app.state.metrics = worker, metrics

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request, exc):
        return _error(400, protocol.validation_errors_body(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        return _error(exc.status_code, protocol.error_body(str(exc.detail), code=exc.status_code))

    @app.get("/health")
    async def health():
        if worker.stopping or not worker.thread.is_alive():
            return _error(503, {"status": "stopping"})
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        manifest = model.manifest
        return {"object": "list", "data": [{
            "id": name, "object": "model", "created": int(time.time()), "owned_by": "calm-edge",
            "kind": manifest.kind, "chunk_size": K, "max_context_tokens": model.max_context * K}]}

    @app.get("/metrics")
    async def prometheus():
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    async def parse(request, schema):
        raw = await request.body()
        try:
            data = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            return None, _error(400, protocol.error_body(f"the request body is not UTF-8 ({e.reason} at byte {e.start})"))
        except json.JSONDecodeError as e:
            return None, _error(400, protocol.error_body(f"the request body is not valid JSON ({e.msg} at character {e.pos})"))
        if not isinstance(data, dict):
            return None, _error(400, protocol.error_body("the request body must be a JSON object"))
        try:
            return schema.model_validate(data), None
        except ValidationError as e:
            return None, _error(400, protocol.validation_errors_body(e.errors()))

    def admit(body, prompt_text, stops, loop):
        """The request's Job, or the error response that refuses it before it is queued."""
        ids = model.tokenizer.encode_prompt(prompt_text)
        positions = -(-len(ids) // K)
        if positions >= model.max_context:
            return None, _error(400, protocol.error_body(
                f"the prompt takes {len(ids)} tokens ({positions} positions) but the model's context holds "
                f"{model.max_context} positions of {K} tokens, including at least one to generate; shorten it",
                param="prompt" if not isinstance(body, protocol.ChatRequest) else "messages",
                code="context_length_exceeded"))
        room = (model.max_context - positions) * K
        max_tokens = body.max_tokens if body.max_tokens is not None else room
        if max_tokens > room:
            return None, _error(400, protocol.error_body(
                f"max_tokens {max_tokens} does not fit: the prompt leaves room for {room} tokens in the model's "
                f"context of {model.max_context * K}; ask for at most {room}", param="max_tokens",
                code="context_length_exceeded"))
        seed = body.seed if body.seed is not None else secrets.randbits(63)
        params = GeneratorParams(max_new_tokens=max_tokens, temperature=body.temperature, method=body.extra.method,
                                 candidates=body.extra.candidates, seed=seed,
                                 stop_at_eos=not body.extra.ignore_eos)
        job = Job(id=protocol.new_id("req"), prompt_ids=ids, params=params, loop=loop, timeout=request_timeout,
                  tracker=TextTracker(model.tokenizer, stops))
        try:
            worker.submit(job)
        except QueueFull as e:
            return None, _error(429, protocol.error_body(str(e), kind="rate_limit_error", code="queue_full"),
                                headers={"Retry-After": str(e.retry_after)})
        except ShuttingDown:
            return None, _error(503, protocol.error_body("the server is shutting down", kind="server_error"))
        return job, None

    async def respond(request, schema, chat):
        body, refusal = await parse(request, schema)
        if refusal:
            return refusal
        stops = list(body.stop) + ([protocol.CHAT_STOP] if chat else [])
        prompt_text = protocol.chat_prompt(body.messages) if chat else body.prompt
        job, refusal = admit(body, prompt_text, stops, asyncio.get_running_loop())
        if refusal:
            return refusal
        responder = protocol.Responder(chat, name, job.params.seed)
        if body.stream:
            return StreamingResponse(_sse(job, responder), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await _whole(request, job, responder)

    async def _whole(request, job, responder):
        try:
            while True:
                try:
                    event = await asyncio.wait_for(job.events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        worker.cancel(job.id)
                        return Response(status_code=499)
                    continue
                if event[0] == "end":
                    return responder.whole(job.text, event[1], len(job.prompt_ids), job.completion_tokens)
                if event[0] == "error":
                    return _error(event[1], event[2])
        except asyncio.CancelledError:
            worker.cancel(job.id)
            raise

    async def _sse(job, responder):
        finished = False
        try:
            while True:
                event = await job.events.get()
                if event[0] == "text":
                    if event[1]:
                        yield _event(responder.chunk(event[1]))
                    continue
                finished = True
                if event[0] == "end":
                    yield _event(responder.chunk("", event[1]))
                    yield _event(responder.usage_chunk(len(job.prompt_ids), job.completion_tokens))
                else:
                    yield _event(event[2])
                yield "data: [DONE]\n\n"
                return
        finally:
            if not finished:  # the client went away mid-stream: its row is freed at the next step
                worker.cancel(job.id)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await respond(request, protocol.CompletionRequest, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await respond(request, protocol.ChatRequest, chat=True)

    outer = CountRequests(BodyLimit(app, max_body_bytes), metrics)  # outermost: a 413 is counted too
    outer.state = app.state  # the worker and metrics, as on the FastAPI app
    return outer


# Server-sent events end a line at CR or LF only, but clients that read them with Python's
# str.splitlines (httpx's aiter_lines among them) also break lines at U+0085, U+2028 and U+2029.
# JSON escapes every other line break; these three are escaped too, so any text streams intact.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def _event(obj):
    return f"data: {json.dumps(obj, ensure_ascii=False).translate(_LINE_BREAKS)}\n\n"


def serve(model, host="127.0.0.1", port=8000, shutdown_timeout=30.0, log_level="warning", on_ready=None, **options):
    """Run the server until SIGTERM or Ctrl-C; in-flight requests get `shutdown_timeout` seconds to finish."""
    import gc
    import sys

    import uvicorn

    # The engine thread's Python (sampling, bookkeeping) and the event loop share the GIL; a
    # request that arrives should not wait the default 5 ms for it.
    sys.setswitchinterval(0.0005)
    app = create_app(model, shutdown_timeout=shutdown_timeout, **options)
    # uvicorn waits for open connections a little longer than the worker gives requests, so every
    # response ends with the worker's 503 (or finishes) instead of a cut connection.
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=shutdown_timeout + 5, lifespan="on")
    server = uvicorn.Server(config)
    handle_exit = server.handle_exit
    original_startup = server.startup

    async def startup(sockets=None):
        await original_startup(sockets=sockets)
        # The model, sessions and app are long-lived: frozen out of the collector, a collection
        # scans only what requests allocate, and its pauses stay short.
        gc.collect()
        gc.freeze()
        if server.started and on_ready is not None:
            on_ready(server)
    server.startup = startup

    def on_signal(sig, frame):
        app.state.worker.begin_stop(shutdown_timeout)
        handle_exit(sig, frame)
    server.handle_exit = on_signal
    server.run()
