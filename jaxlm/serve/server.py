"""The OpenAI-compatible HTTP server over one :class:`~jaxlm.serve.engine.Engine` (FastAPI + uvicorn).

    GET  /v1/models                the served model (one)
    POST /v1/completions           OpenAI's completions: prompt text, ids, or a batch of either
    POST /v1/chat/completions      OpenAI's chat completions
    POST /tokenize, /detokenize    vLLM's shapes
    GET  /health                   {"status": "ok"}
    GET  /metrics                  Prometheus text (prometheus_client): every value of Engine.stats()

Request bodies are checked by :mod:`jaxlm.serve.protocol` (size, depth, Unicode, types, ranges)
and by :meth:`Engine.check` (prompt length against the context, token ids against the vocabulary)
before anything is queued; a bad request is a 400, a body over the size limit 413, an unknown
route 404, a wrong method 405, a model name other than the served one 404 ``model_not_found``,
a missing or wrong ``--api-key`` 401; every error is OpenAI's ``{"error": {"message", "type",
"param", "code"}}``. One engine thread (:class:`EngineLoop`) runs the scheduler; each HTTP request
queues its engine requests (``n`` per prompt; choice ``j`` of a seeded request uses ``seed + j``)
and reads their events. A client that goes away, streaming or not, cancels its requests: their
KV pages are freed at once. Chat messages are rendered with the model's chat template when it has
one (``apply_chat_template(..., add_generation_prompt=True)``'s ids), else joined as
``role: content`` lines followed by ``assistant:``; a chat request without a length limit runs
until EOS or the context ends. Log-probabilities are of the distribution each token was sampled
from (:class:`jaxlm.serve.request.TokenLogprobs`).
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import secrets
import socket
import sys
import threading
import time
import traceback
import uuid
from typing import Any, Callable

import uvicorn
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request as HTTPRequest

from jaxlm.errors import ServeError
from jaxlm.interop.chat import ChatTemplateError
from jaxlm.serve.engine import Engine
from jaxlm.serve.exporter import EngineCollector
from jaxlm.serve.protocol import (
    MAX_BODY_BYTES, BadRequest, ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest,
    error_body, parse_body, validation_message,
)
from jaxlm.serve.request import RequestError
from jaxlm.serve.responses import Choices, build_requests

WAIT_S = 600.0  # longest a request may take before it is cancelled (504)
BODY_TIMEOUT_S = 30.0  # longest a client may take to send its body (408)
POLL_S = 0.25  # how often a waiting non-streaming request checks that its client is still there


class EngineLoop:
    """Runs the engine's scheduler on its own thread; other threads submit requests and read events.

    A request's events (then its output), or the exception that failed it, go to its ``deliver``
    callback (called on the engine thread) or, without one, onto the queue :meth:`submit` returns.
    A failure while queueing one request, or while making its output, fails only that request; a
    failed step (the device call) fails the requests running in it, and the queued ones go on.
    """

    def __init__(self, engine: Engine):
        self.engine = engine
        self._inbox: queue.Queue = queue.Queue()
        self._listeners: dict[str, Callable[[Any], None]] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)

    def start(self) -> EngineLoop:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join()

    def submit(self, request, deliver: Callable[[Any], None] | None = None) -> queue.Queue | None:
        """Queue a checked request; its events go to ``deliver`` or onto the returned queue."""
        events = None
        if deliver is None:
            events = queue.Queue()
            deliver = events.put
        self._inbox.put(("add", request, deliver))
        self._wake.set()
        return events

    def cancel(self, request_id: str) -> None:
        """Drop a request (queued, running or not yet seen); its pages are freed and its events stop."""
        self._inbox.put(("cancel", request_id, None))
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            while not self._inbox.empty():
                kind, item, deliver = self._inbox.get()
                if kind == "cancel":
                    self.engine.abort(item)
                    self._listeners.pop(item, None)
                    continue
                try:
                    self._listeners[self.engine.add_request(item)] = deliver
                except Exception as e:  # noqa: BLE001 - this request fails, the others go on
                    deliver(e)
            if not self.engine.has_work():
                self._wake.wait(0.1)
                self._wake.clear()
                continue
            try:
                events = self.engine.step()
            except Exception as e:  # noqa: BLE001 - a failed step: fail the requests it ran, keep serving
                traceback.print_exc(file=sys.stderr)
                for rid in [s.request_id for s in self.engine.running]:
                    self.engine.abort(rid)
                    deliver = self._listeners.pop(rid, None)
                    if deliver is not None:
                        deliver(RuntimeError(f"engine step failed: {type(e).__name__}: {e}"))
                continue
            for event in events:
                deliver = self._listeners.get(event.request_id)
                if deliver is not None:
                    deliver(event)
                if event.output is not None or event.error is not None:
                    self._listeners.pop(event.request_id, None)


def _chat_prompt(messages: list[dict[str, str]], chat_prompt_ids=None) -> str | list[int]:
    """The prompt for chat ``messages``: ids from the model's template, else ``role: content`` lines."""
    if chat_prompt_ids is None:
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    try:
        return chat_prompt_ids(messages)
    except ChatTemplateError as e:
        raise BadRequest(str(e), "messages") from None


class _EventStream(StreamingResponse):
    """Server-sent events that run ``on_close`` however the stream ends (finished, failed, client gone)."""

    def __init__(self, content, on_close: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def create_app(loop: EngineLoop, model_name: str, chat_prompt_ids=None, api_key: str | None = None,
               wait_s: float = WAIT_S) -> FastAPI:
    """The FastAPI application serving ``loop``'s engine as ``model_name``."""
    engine = loop.engine
    # redirect_slashes off: '/v1/completions/' is an unknown route (a 404 in OpenAI's shape), not a 307
    app = FastAPI(title="jaxlm", docs_url=None, redoc_url=None, openapi_url=None, redirect_slashes=False)
    registry = CollectorRegistry(auto_describe=True)
    registry.register(EngineCollector(engine.stats))
    created = int(time.time())

    def error(status: int, message: str, kind: str = "invalid_request_error", param=None, code=None) -> JSONResponse:
        return JSONResponse(error_body(message, kind, param, code), status_code=status)

    @app.exception_handler(BadRequest)
    async def _bad_request(request, e: BadRequest):
        return error(e.status, e.message, e.kind, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        return error(400, str(e.errors()[0].get("msg", e)))

    @app.exception_handler(HTTPException)
    async def _http(request, e: HTTPException):
        if e.status_code == 404:
            return error(404, f"no route {request.method} {request.url.path}; see GET /v1/models, POST "
                              "/v1/completions, /v1/chat/completions, /tokenize, /detokenize", code="not_found")
        if e.status_code == 405:
            return error(405, f"method {request.method} is not allowed on {request.url.path}", code="method_not_allowed")
        return error(e.status_code, str(e.detail))

    @app.exception_handler(Exception)
    async def _crash(request, e: Exception):
        traceback.print_exception(e, file=sys.stderr)
        return error(500, f"{type(e).__name__}: {e}", "server_error")

    def authorize(request: HTTPRequest) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise BadRequest("missing or incorrect API key: send the header 'Authorization: Bearer <key>' "
                             "with the server's --api-key", status=401, code="invalid_api_key")

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise BadRequest(f"The model `{name}` does not exist; this server serves `{model_name}` (GET /v1/models)",
                             "model", status=404, code="model_not_found")

    async def read_json(request: HTTPRequest, model):
        authorize(request)
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > MAX_BODY_BYTES:
            raise BadRequest(f"the body is {size} bytes; the limit is {MAX_BODY_BYTES}", status=413)

        async def read() -> bytes:
            chunks, total = [], 0
            async for chunk in request.stream():
                total += len(chunk)
                if total > MAX_BODY_BYTES:
                    raise BadRequest(f"the body is over the limit of {MAX_BODY_BYTES} bytes", status=413)
                chunks.append(chunk)
            return b"".join(chunks)

        try:
            body = await asyncio.wait_for(read(), BODY_TIMEOUT_S)
        except TimeoutError:
            raise BadRequest(f"the body did not arrive within {BODY_TIMEOUT_S:.0f} s", status=408) from None
        try:
            return model.model_validate(parse_body(body), strict=True)
        except ValidationError as e:
            raise BadRequest(*validation_message(e)) from None

    def tokenizer():
        if engine.tokenizer is None:
            raise BadRequest("this server has no tokenizer: send token ids")
        return engine.tokenizer

    @app.api_route("/health", methods=["GET", "HEAD"])  # HEAD: what load balancers' probes send
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "jaxlm",
                "max_model_len": engine.max_context}

    @app.get("/v1/models")
    async def models(request: HTTPRequest):
        authorize(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: HTTPRequest):
        authorize(request)
        check_model(name)
        return model_card()

    def chat_ids(messages) -> list[int]:
        prompt = _chat_prompt([m.as_dict() for m in messages], chat_prompt_ids)
        return tokenizer().encode(prompt).ids if isinstance(prompt, str) else list(prompt)

    @app.post("/tokenize")
    async def tokenize(request: HTTPRequest):
        body = await read_json(request, TokenizeRequest)
        check_model(body.model)
        if body.messages is not None:
            ids = chat_ids(body.messages)
        else:
            ids = tokenizer().encode(body.prompt, add_special_tokens=body.add_special_tokens is not False).ids
        return {"count": len(ids), "max_model_len": engine.max_context, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(request: HTTPRequest):
        body = await read_json(request, DetokenizeRequest)
        check_model(body.model)
        bad = [t for t in body.tokens if t >= engine.cfg.vocab_size]
        if bad:
            raise BadRequest(f"token id {bad[0]} is outside the vocabulary [0, {engine.cfg.vocab_size})", "tokens")
        return {"prompt": tokenizer().decode(body.tokens)}

    async def generate(request: HTTPRequest, chat: bool):
        body = await read_json(request, ChatCompletionRequest if chat else CompletionRequest)
        check_model(body.model)
        if chat:
            prompts = [chat_ids(body.messages)]
        elif isinstance(body.prompt, str) or isinstance(body.prompt[0], int):
            prompts = [body.prompt]
        else:
            prompts = list(body.prompt)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        requests = build_requests(engine, body, prompts, chat, rid)
        for r in requests:
            try:
                engine.check(r)
            except RequestError as e:
                raise BadRequest(str(e)) from None
        choices = Choices(engine, body, requests, prompts, chat, model_name, rid)
        aloop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        for i, r in enumerate(requests):
            loop.submit(r, lambda item, i=i: aloop.call_soon_threadsafe(events.put_nowait, (i, item)))

        def cancel_unfinished() -> None:
            for i in choices.unfinished():
                loop.cancel(requests[i].request_id)

        deadline = time.monotonic() + wait_s
        if body.stream:
            async def sse():
                while choices.unfinished():
                    try:
                        i, item = await asyncio.wait_for(events.get(), max(deadline - time.monotonic(), 0))
                    except TimeoutError:
                        yield choices.sse(error_body(f"the request did not finish within {wait_s:.0f} s", "timeout"))
                        return
                    if isinstance(item, Exception) or item.error is not None:
                        yield choices.sse(error_body(str(item if isinstance(item, Exception) else item.error), "server_error"))
                        return
                    chunk = choices.chunk(i, item)
                    if chunk is not None:
                        yield chunk
                usage = choices.usage_chunk()
                if usage is not None:
                    yield usage
                yield "data: [DONE]\n\n"

            return _EventStream(sse(), cancel_unfinished)
        try:
            checked = time.monotonic()
            while choices.unfinished():
                try:
                    i, item = await asyncio.wait_for(events.get(), POLL_S)
                except TimeoutError:
                    item = None
                if time.monotonic() - checked >= POLL_S:  # events may never pause: check by the clock
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        return Response(status_code=499)  # nobody reads it: the requests are cancelled below
                    if checked > deadline:
                        raise BadRequest(f"the request did not finish within {wait_s:.0f} s", status=504,
                                         kind="timeout")
                if item is None:
                    continue
                if isinstance(item, RequestError):
                    raise BadRequest(str(item))
                if isinstance(item, Exception) or item.error is not None:
                    return error(500, str(item if isinstance(item, Exception) else item.error), "server_error")
                choices.add(i, item)
            return choices.response()
        finally:
            cancel_unfinished()

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        return await generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        return await generate(request, chat=True)

    return app


def _listen(host: str, port: int) -> socket.socket:
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as e:  # address in use, a host name that does not resolve, a port needing privileges
        raise ServeError(f"cannot listen on {host}:{port} ({e.strerror or e}); choose another --port or --host") from None
    return sock


def _server(app: FastAPI) -> uvicorn.Server:
    return uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_keep_alive=5,
                                         timeout_graceful_shutdown=5, h11_max_incomplete_event_size=64 * 1024))


def serve(engine: Engine, host: str = "127.0.0.1", port: int = 8000, model_name: str = "jaxlm", ready=None,
          chat_prompt_ids=None, api_key: str | None = None) -> None:
    """Serve until interrupted (SIGINT/SIGTERM). ``ready(address)`` is called once the socket listens.

    ``chat_prompt_ids(messages) -> ids`` renders chat requests (``ChatTemplate.prompt_ids``), if the
    model has a template; ``api_key`` makes every route but /health and /metrics require
    ``Authorization: Bearer <api_key>``. Raises :class:`ServeError` if the address cannot be bound.
    """
    sock = _listen(host, port)
    loop = EngineLoop(engine).start()
    try:
        server = _server(create_app(loop, model_name, chat_prompt_ids, api_key))
        if ready is not None:
            ready(sock.getsockname()[:2])
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
        loop.stop()


@contextlib.contextmanager
def running_server(engine: Engine, model_name: str = "jaxlm", chat_prompt_ids=None, api_key: str | None = None,
                   host: str = "127.0.0.1"):
    """Serve ``engine`` on a free port from a background thread; yields the base URL (for tests and notebooks)."""
    sock = _listen(host, 0)
    loop = EngineLoop(engine).start()
    server = _server(create_app(loop, model_name, chat_prompt_ids, api_key))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="http", daemon=True)
    thread.start()
    try:
        while not server.started and thread.is_alive():
            time.sleep(0.01)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join()
        sock.close()
        loop.stop()
