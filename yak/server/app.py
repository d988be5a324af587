"""The Flask app: ``/api/chat``, ``/v1/chat/completions``, ``/v1/models``, ``/health``, ``/api/limits``,
``/api/count_tokens``, and the chat page at ``/`` (files in ``yak/web/``)."""

from __future__ import annotations

import json
import logging
import os
import queue
import time
import uuid
from typing import Any, Callable, Iterator

from yak.server.service import HEARTBEAT_S, ChatService
from yak.server.validation import BadRequest, parse_json

logger = logging.getLogger(__package__)  # "yak.server", the name its log lines have always shown

HEARTBEAT = ": keep-alive\n\n"  # an SSE comment, sent every HEARTBEAT_S while a stream has no new text


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _text_events(streamer, event: Callable[[str], str]) -> Iterator[str]:
    """``event(piece)`` for each piece of text as it comes, and :data:`HEARTBEAT` when none came for a while
    (the streamer gives an empty piece for new tokens whose text it holds back, and nothing while queued)."""
    last = time.monotonic()
    while True:
        try:
            piece = next(streamer)
        except queue.Empty:  # the streamer's timeout
            piece = ""
        except StopIteration:
            return
        if piece or time.monotonic() - last >= HEARTBEAT_S:
            yield event(piece) if piece else HEARTBEAT
            last = time.monotonic()


def _event_stream(events: Iterator[str], request):
    """The SSE response; closing it (the client went away, or the stream ended) cancels the request.

    The server closes the response even when the generator never ran, which a ``finally`` in the generator
    would miss.
    """
    from flask import Response

    response = Response(events, mimetype="text/event-stream", headers={"Cache-Control": "no-cache"})
    response.call_on_close(request.cancel)
    return response


def create_app(service: ChatService):
    """Build the Flask app around a ready :class:`ChatService` (the model is already loaded)."""
    from flask import Flask, request
    from werkzeug.exceptions import HTTPException

    app = Flask("yak")
    app.config["MAX_CONTENT_LENGTH"] = service.args.max_body_bytes
    if service.args.cors_origin:
        from flask_cors import CORS

        CORS(app, origins=service.args.cors_origin)
    app.json.ensure_ascii = False  # Tibetan stays readable in answers

    too_large = (f"Request Entity Too Large: the request body is over {service.args.max_body_bytes} bytes (the "
                 "server's --max_body_bytes)")

    def error(message: str, status: int):
        kind = "invalid_request_error" if status < 500 else "server_error"
        return app.json.response({"error": {"message": message, "type": kind, "code": status}}), status

    @app.errorhandler(BadRequest)
    def bad_request(e: BadRequest):
        return error(str(e), e.status)

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException):  # 404, 405, 413 ... as JSON too
        return error(too_large if e.code == 413 else f"{e.name}: {e.description}", e.code or 500)

    @app.errorhandler(Exception)
    def internal_error(e: Exception):
        logger.exception("request failed")
        return error(f"internal error: {e}", 500)

    def body() -> Any:
        raw = request.get_data(cache=False)
        # A chunked body has no Content-Length for werkzeug to refuse: it stops reading at the limit instead
        # (waitress gives the length of the body it received).
        if request.content_length is None and len(raw) >= service.args.max_body_bytes:
            raise BadRequest(too_large, status=413)
        return parse_json(raw)

    def client_gone() -> Callable[[], bool] | None:
        return request.environ.get("waitress.client_disconnected")  # None under other WSGI servers

    @app.get("/health")
    def health():
        return {"status": "ok", "model": service.model_name, **service.engine.load}

    @app.post("/api/chat")
    def chat():
        data = body()
        query, messages, params = service.parse_chat(data)
        stream = bool(data.get("stream"))
        req, _, streamer = service.submit(messages, params, stream)
        if not stream:
            return {"query": query, "output": service.answer(req, client_gone())}

        def events():
            yield from _text_events(streamer, lambda piece: _sse({"delta": piece}))
            if req.error is not None:
                yield _sse({"error": {"message": f"generation failed: {req.error}", "type": "server_error"}})
            else:
                yield _sse({"query": query, "output": service.answer(req), "finish_reason": req.finish_reason})

        return _event_stream(events(), req)

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": service.model_name, "object": "model", "created": 0,
                                            "owned_by": "yak"}]}

    @app.post("/v1/chat/completions")
    def chat_completions():
        data = body()
        messages, params = service.parse_openai(data)
        req, prompt_ids, streamer = service.submit(messages, params, bool(data.get("stream")))
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": completion_id, "created": created, "model": service.model_name}

        def usage():
            n = len(req.output_ids)
            return {"prompt_tokens": len(prompt_ids), "completion_tokens": n, "total_tokens": len(prompt_ids) + n}

        if not data.get("stream"):
            text = service.answer(req, client_gone())
            return {**head, "object": "chat.completion", "usage": usage(), "choices": [{
                "index": 0, "message": {"role": "assistant", "content": text},
                "finish_reason": req.finish_reason}]}

        def chunk(delta: dict, finish_reason=None, **extra) -> str:
            return _sse({**head, "object": "chat.completion.chunk", **extra, "choices": [
                {"index": 0, "delta": delta, "finish_reason": finish_reason}]})

        def events():
            yield chunk({"role": "assistant", "content": ""})
            yield from _text_events(streamer, lambda piece: chunk({"content": piece}))
            if req.error is not None:
                yield _sse({"error": {"message": f"generation failed: {req.error}", "type": "server_error"}})
                return
            yield chunk({}, req.finish_reason)
            if (data.get("stream_options") or {}).get("include_usage"):
                yield _sse({**head, "object": "chat.completion.chunk", "choices": [], "usage": usage()})
            yield "data: [DONE]\n\n"

        return _event_stream(events(), req)

    _add_page_routes(app, service, body)
    return app


WEB_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "web")  # yak/web
WEB_FILES = ("chat.css", "chat.js")


def _add_page_routes(app, service: ChatService, body: Callable[[], Any]) -> None:
    """``GET /api/limits`` and ``POST /api/count_tokens`` (what a client needs to fit a conversation in the
    model), and unless ``--no_web_ui`` the chat page: ``GET /`` and its two files under ``/web/``."""
    from flask import send_from_directory
    from werkzeug.exceptions import NotFound

    @app.get("/api/limits")
    def limits():
        return service.limits()

    @app.post("/api/count_tokens")
    def count_tokens():  # the /api/chat body; the answer is the prompt's length in tokens
        _, messages, _ = service.parse_chat(body())
        return {"prompt_tokens": service.count_tokens(messages),
                "max_total_tokens": service.engine.max_total_tokens}

    if service.args.no_web_ui:
        return

    @app.get("/")
    def page():
        return send_from_directory(WEB_DIR, "index.html", max_age=0)

    @app.get("/web/<name>")
    def page_file(name: str):
        if name not in WEB_FILES:
            raise NotFound()
        return send_from_directory(WEB_DIR, name, max_age=0)
