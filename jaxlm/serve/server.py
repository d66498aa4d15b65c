"""An OpenAI-style HTTP server over one :class:`~jaxlm.serve.engine.Engine` (standard library only).

    POST /v1/completions        {"prompt": "text" | [ids], "max_tokens": 16, "temperature": 1.0, ...}
    POST /v1/chat/completions   {"messages": [{"role": "user", "content": "..."}], ...}
    GET  /health                {"status": "ok"}
    GET  /metrics               Prometheus text: KV-cache use, batch, queue, tokens/s, TTFT, ITL ...

``"stream": true`` answers with server-sent events (``data: {chunk}`` lines, then ``data: [DONE]``).
One engine thread (:class:`EngineLoop`) runs the scheduler; HTTP threads enqueue their request
and wait for its events. A malformed request gets a 400 with ``{"error": {"message": ...}}``.
Chat messages are rendered with the model's own chat template when its tokenizer folder carries
one (converted instruct models, see :mod:`jaxlm.interop.chat`) into the prompt ids transformers'
``apply_chat_template(..., tokenize=True, add_generation_prompt=True)`` gives (a template that
fails to render answers 400 with its message); otherwise they are joined as ``role: content``
lines followed by ``assistant:`` and encoded like a completion prompt. Generation stops at any id
of the engine's EOS set; ``stop_token_ids`` adds ids, ``ignore_eos`` turns the set off. Text,
streamed or not, comes from the engine's incremental detokenizer (:mod:`jaxlm.detokenize`).
"""

from __future__ import annotations

import json
import queue
import sys
import threading
import time
import traceback
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from jaxlm.errors import ServeError
from jaxlm.interop.chat import ChatTemplateError
from jaxlm.serve.engine import Engine, Event
from jaxlm.serve.metrics import prometheus_text
from jaxlm.serve.request import Request, RequestError

WAIT_S = 600.0  # longest a client waits for its request to finish

_COMMON = {  # field -> (accepted JSON types, default)
    "model": ((str,), None),
    "max_tokens": ((int,), 16),
    "temperature": ((int, float), 1.0),
    "top_p": ((int, float), 1.0),
    "top_k": ((int,), 0),
    "stop": ((str, list), None),
    "seed": ((int,), None),
    "stream": ((bool,), False),
    "stop_token_ids": ((list,), None),
    "ignore_eos": ((bool,), False),
}
_FIELDS = {
    "/v1/completions": {"prompt": ((str, list), None), **_COMMON},
    "/v1/chat/completions": {"messages": ((list,), None), **_COMMON},
}


class EngineLoop:
    """Runs the engine's scheduler on its own thread; other threads submit requests and read events."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._inbox: queue.Queue = queue.Queue()
        self._listeners: dict[str, queue.Queue] = {}
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

    def submit(self, request: Request) -> queue.Queue:
        """Queue a checked request; its events (then its output, or an exception) arrive on the returned queue."""
        events: queue.Queue = queue.Queue()
        self._inbox.put(("add", request, events))
        self._wake.set()
        return events

    def cancel(self, request_id: str) -> None:
        self._inbox.put(("cancel", request_id, None))
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            while not self._inbox.empty():
                kind, item, events = self._inbox.get()
                if kind == "cancel":
                    self.engine.abort(item)
                    self._listeners.pop(item, None)
                    continue
                try:
                    self._listeners[self.engine.add_request(item)] = events
                except RequestError as e:
                    events.put(e)
            if not self.engine.has_work():
                self._wake.wait(0.1)
                self._wake.clear()
                continue
            try:
                events = self.engine.step()
            except Exception as e:  # noqa: BLE001 - fail the requests in flight, keep serving
                traceback.print_exc(file=sys.stderr)
                for rid, listener in list(self._listeners.items()):
                    self.engine.abort(rid)
                    listener.put(RuntimeError(f"engine step failed: {type(e).__name__}: {e}"))
                self._listeners.clear()
                continue
            for event in events:
                listener = self._listeners.get(event.request_id)
                if listener is not None:
                    listener.put(event)
                if event.output is not None:
                    self._listeners.pop(event.request_id, None)


class _BadRequest(Exception):
    pass


def _parse(path: str, body: bytes, chat_prompt_ids=None) -> tuple[dict[str, Any], Request]:
    """The request body's fields and the engine request they describe, or :class:`_BadRequest`.

    ``chat_prompt_ids(messages) -> prompt ids`` applies the model's chat template, if it has one.
    """
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _BadRequest(f"the body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise _BadRequest("the body must be a JSON object")
    fields = _FIELDS[path]
    for key, value in data.items():
        if key not in fields:
            raise _BadRequest(f"unknown field '{key}'; accepted fields: {', '.join(fields)}")
        types = fields[key][0]
        if value is not None and (not isinstance(value, types) or (isinstance(value, bool) and bool not in types)):
            raise _BadRequest(f"field '{key}' must be {' or '.join(t.__name__ for t in types)}, got {json.dumps(value)}")
    get = {k: (data[k] if data.get(k) is not None else default) for k, (_, default) in fields.items()}
    stop = get["stop"]
    stop = () if stop is None else (stop,) if isinstance(stop, str) else tuple(stop)
    stop_token_ids = get["stop_token_ids"] or []
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in stop_token_ids):
        raise _BadRequest(f"field 'stop_token_ids' must be a list of token ids, got {json.dumps(stop_token_ids)}")
    if path == "/v1/chat/completions":
        prompt = _chat_prompt(get["messages"], chat_prompt_ids)
    else:
        prompt = get["prompt"]
        if prompt is None:
            raise _BadRequest("field 'prompt' is required: a string or a list of token ids")
    request = Request(
        prompt if isinstance(prompt, str) else list(prompt), max_tokens=get["max_tokens"], temperature=get["temperature"],
        top_k=get["top_k"], top_p=get["top_p"], stop=stop, seed=get["seed"], request_id=f"cmpl-{uuid.uuid4().hex[:24]}",
        stop_token_ids=tuple(stop_token_ids), ignore_eos=get["ignore_eos"],
    )
    return get, request


def _chat_prompt(messages: Any, chat_prompt_ids=None) -> str | list[int]:
    """The prompt for chat ``messages``: ids from the model's template, else ``role: content`` lines."""
    if not messages:
        raise _BadRequest("field 'messages' is required: a non-empty list of {\"role\", \"content\"} objects")
    lines = []
    for m in messages:
        if not isinstance(m, dict) or set(m) != {"role", "content"} or not isinstance(m["content"], str):
            raise _BadRequest("each message must be an object with exactly 'role' and 'content' (a string)")
        if m["role"] not in ("system", "user", "assistant"):
            raise _BadRequest(f"message role must be system, user or assistant, got {json.dumps(m['role'])}")
        lines.append(f"{m['role']}: {m['content']}\n")
    if chat_prompt_ids is None:
        return "".join(lines) + "assistant:"
    try:
        return chat_prompt_ids(messages)
    except ChatTemplateError as e:
        raise _BadRequest(str(e)) from None


def make_handler(loop: EngineLoop, model_name: str, chat_prompt_ids=None):
    engine = loop.engine

    class Handler(BaseHTTPRequestHandler):
        server_version = "jaxlm"

        def log_message(self, format, *args):  # noqa: A002 - quiet: /metrics is the record
            pass

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, obj: Any) -> None:
            self._send(status, json.dumps(obj).encode(), "application/json")

        def _error(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
            self._json(status, {"error": {"message": message, "type": kind}})

        def do_GET(self):  # noqa: N802
            if self.path == "/health":
                self._json(200, {"status": "ok"})
            elif self.path == "/metrics":
                self._send(200, prometheus_text(engine.stats()).encode(), "text/plain; version=0.0.4; charset=utf-8")
            else:
                self._error(404, f"no route GET {self.path}; try /health, /metrics, POST /v1/completions")

        def do_POST(self):  # noqa: N802
            if self.path not in _FIELDS:
                return self._error(404, f"no route POST {self.path}; try /v1/completions or /v1/chat/completions")
            try:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                fields, request = _parse(self.path, body, chat_prompt_ids)
                engine.check(request)
            except (_BadRequest, RequestError, ValueError) as e:
                return self._error(400, str(e))
            chat = self.path == "/v1/chat/completions"
            events = loop.submit(request)
            if fields["stream"]:
                return self._stream(request, events, chat)
            while True:
                event = self._next(events, request)
                if event is None or event.output is not None:
                    break
            if event is None:
                return
            out = event.output
            choice = {"index": 0, "finish_reason": out.finish_reason}
            choice.update({"message": {"role": "assistant", "content": out.text}} if chat else {"text": out.text})
            self._json(200, {
                "id": request.request_id, "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": model_name, "choices": [choice],
                "usage": {"prompt_tokens": len(out.prompt_ids), "completion_tokens": len(out.token_ids),
                          "total_tokens": len(out.prompt_ids) + len(out.token_ids)},
            })

        def _next(self, events: queue.Queue, request: Request) -> Event | None:
            """The next event, or None after answering an error."""
            try:
                item = events.get(timeout=WAIT_S)
            except queue.Empty:
                loop.cancel(request.request_id)
                self._error(504, f"the request did not finish within {WAIT_S:.0f} s", "timeout")
                return None
            if isinstance(item, RequestError):
                self._error(400, str(item))
                return None
            if isinstance(item, Exception):
                self._error(500, str(item), "server_error")
                return None
            return item

        def _stream(self, request: Request, events: queue.Queue, chat: bool) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            head = {"id": request.request_id, "object": "chat.completion.chunk" if chat else "text_completion",
                    "created": int(time.time()), "model": model_name}
            first = True
            try:
                while True:
                    item = events.get(timeout=WAIT_S)
                    if isinstance(item, Exception):
                        self._sse({"error": {"message": str(item), "type": "server_error"}})
                        break
                    delta = item.text
                    reason = item.output.finish_reason if item.output is not None else None
                    if delta or reason:
                        if chat:
                            d = {"role": "assistant", "content": delta} if first else {"content": delta}
                            choice = {"index": 0, "delta": d, "finish_reason": reason}
                        else:
                            choice = {"index": 0, "text": delta, "finish_reason": reason}
                        self._sse({**head, "choices": [choice]})
                        first = False
                    if reason:
                        break
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError, queue.Empty):
                loop.cancel(request.request_id)

        def _sse(self, obj: Any) -> None:
            self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
            self.wfile.flush()

    return Handler


def serve(
    engine: Engine, host: str = "127.0.0.1", port: int = 8000, model_name: str = "jaxlm", ready=None, chat_prompt_ids=None
) -> None:
    """Serve until interrupted. ``ready(address)`` is called once the socket listens.

    ``chat_prompt_ids(messages) -> ids`` renders chat requests (``ChatTemplate.prompt_ids``), if the model has a template.
    """
    loop = EngineLoop(engine)
    try:
        server = ThreadingHTTPServer((host, port), make_handler(loop, model_name, chat_prompt_ids))
    except OSError as e:  # address in use, a host name that does not resolve, a port needing privileges
        raise ServeError(f"cannot listen on {host}:{port} ({e.strerror or e}); choose another --port or --host") from None
    loop.start()
    server.daemon_threads = True
    if ready is not None:
        ready(server.server_address)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        loop.stop()
