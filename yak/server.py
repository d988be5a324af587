"""HTTP serving: a Flask app factory with ``/api/chat``, OpenAI-compatible ``/v1/chat/completions``, ``/health``,
and the chat page at ``/`` (files in ``yak/web/``).

One model per process: the app holds one :class:`yak.generation.engine.Engine`, whose worker batches all concurrent
requests together. Every request body is checked before it reaches the model: size, UTF-8, JSON, known
fields only, types, ranges, lengths; a bad request gets a 4xx JSON error and the server keeps serving.
Errors look like OpenAI's (``{"error": {"message", "type", "code"}}``) so OpenAI clients report them well.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import queue
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from yak import YakError
from yak.generation.arguments import GenerationArguments
from yak.generation.engine import Engine
from yak.generation.loading import load_for_inference
from yak.generation.prompts import chat_messages, encode_chat
from yak.generation.request import EngineFull, TextStreamer
from yak.generation.sampling import SamplingParams
from yak.source import ModelSource

logger = logging.getLogger(__name__)

CONFIG_ENV = "YAK_SERVE_CONFIG"
# While a stream has no new text (waiting in the queue, or text the streamer holds back until a word ends), an
# SSE comment goes out this often: a server notices that its client went away only when a write fails, and the
# generation is then cancelled.
HEARTBEAT_S = 0.5
HEARTBEAT = ": keep-alive\n\n"
# While a non-streaming answer is generated, whether its client is still connected is asked this often (under
# waitress); a client that went away cancels its request, which frees its batch slot.
DISCONNECT_POLL_S = 0.25


@dataclass
class ServerArguments:
    """Where to listen and what a request may ask for."""

    host: str = field(default="127.0.0.1", metadata={"help": "Interface to bind; 0.0.0.0 exposes the server."})
    port: int = field(default=8718, metadata={"help": "TCP port; 0 takes a free one (the address is printed)."})
    cors_origin: str | None = field(
        default=None,
        metadata={"help": "Allow browser pages from this origin (e.g. http://localhost:3000) or from any ('*') to "
                  "call the API (CORS, through flask-cors). Default: none, same-origin only."},
    )
    max_body_bytes: int = field(default=256 * 1024, metadata={"help": "Largest request body accepted (bytes)."})
    max_query_chars: int = field(
        default=8000, metadata={"help": "Longest query, history message or system prompt (characters)."}
    )
    max_history_turns: int = field(default=16, metadata={"help": "Earlier [user, assistant] turns at most."})
    max_new_tokens_cap: int = field(default=1024, metadata={"help": "Largest max_new_tokens a request may ask."})
    max_queue: int = field(default=256, metadata={"help": "Requests waiting at most; beyond, 503."})
    threads: int = field(
        default=32, metadata={"help": "Requests served at once (waitress threads; at least --max_batch_size). "
                                      "Open connections wait without a thread; more requests wait in line."})
    connection_limit: int = field(
        default=256, metadata={"help": "Open connections at most; beyond, new ones wait until some close."})
    idle_timeout: int = field(
        default=60, metadata={"help": "Seconds an idle connection (no request in progress) stays open."})
    model_name: str | None = field(
        default=None, metadata={"help": "Model id shown by the OpenAI endpoints (default: the model folder name)."}
    )
    no_web_ui: bool = field(default=False, metadata={"help": "Do not serve the chat page at GET /."})


class BadRequest(Exception):
    """A client error: HTTP ``status`` with a message that says what to fix."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------------------------------------- validation

_NUMBER = (int, float)
# field -> (accepted types, type name for messages); bool is rejected where a number is expected.
_SAMPLING_FIELDS = {
    "temperature": (_NUMBER, "a number"),
    "top_p": (_NUMBER, "a number"),
    "top_k": ((int,), "an integer"),
    "repetition_penalty": (_NUMBER, "a number"),
}
_CHAT_FIELDS = {
    "query": ((str,), "a string"),
    "history": ((list,), "a list of [user, assistant] pairs"),
    "system_prompt": ((str,), "a string"),
    "max_new_tokens": ((int,), "an integer"),
    "stream": ((bool,), "true or false"),
    **_SAMPLING_FIELDS,
}
_OPENAI_FIELDS = {
    "model": ((str,), "a string"),
    "messages": ((list,), "a list of messages"),
    "max_tokens": ((int,), "an integer"),
    "max_completion_tokens": ((int,), "an integer"),
    "stream": ((bool,), "true or false"),
    "stream_options": ((dict,), "an object"),
    "n": ((int,), "an integer"),
    "user": ((str,), "a string"),
    # accepted at their neutral values, which OpenAI-style tools often send; anything else is refused
    "presence_penalty": (_NUMBER, "a number"),
    "frequency_penalty": (_NUMBER, "a number"),
    "stop": ((str, list), "a string or a list of strings"),
    "seed": ((int,), "an integer"),
    **_SAMPLING_FIELDS,
}


def _check_fields(body: Any, spec: dict) -> list[str]:
    """Problems with a request object: not an object, unknown fields, wrong types (``null`` = default)."""
    if not isinstance(body, dict):
        return ["the request body must be a JSON object"]
    problems = [f"unknown field '{k}' (accepted: {', '.join(spec)})" for k in body if k not in spec]
    for key, (types, name) in spec.items():
        value = body.get(key)
        bad_type = not isinstance(value, types) or (isinstance(value, bool) and bool not in types)
        if value is not None and (bad_type or (isinstance(value, float) and not math.isfinite(value))):
            problems.append(f"'{key}' must be {name}, got {json.dumps(value)[:40]}")
    return problems


def _parse_json(raw: bytes) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRequest(f"the request body is not valid UTF-8 ({e.reason} at byte {e.start})") from None

    def reject_constant(name):
        raise ValueError(f"{name} is not valid JSON")

    try:
        obj = json.loads(text, parse_constant=reject_constant)
    except (ValueError, RecursionError) as e:
        raise BadRequest(f"the request body is not valid JSON: {e}") from None
    try:  # "\ud800" is valid JSON but not text: the tokenizer would fail on it (a 500)
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest("the request body has a \\u escape of a lone surrogate, which is not text") from None
    return obj


class ChatService:
    """Turns validated requests into engine requests and answers; shared by all request threads.

    Args:
        engine: the running engine.
        tokenizer: the model's tokenizer (with its chat template).
        defaults: sampling settings for fields a request leaves out.
        system_prompt: the server's system prompt (``None`` = the template's default).
        args: the limits (see :class:`ServerArguments`).
        model_name: the id reported by the OpenAI endpoints.
    """

    def __init__(self, engine: Engine, tokenizer, defaults: SamplingParams, system_prompt: str | None,
                 args: ServerArguments, model_name: str):
        self.engine, self.tokenizer, self.defaults = engine, tokenizer, defaults
        self.system_prompt, self.args, self.model_name = system_prompt, args, model_name

    # --- requests -> (prompt ids, params)

    def _text(self, value: str, what: str, problems: list[str]) -> None:
        if len(value) > self.args.max_query_chars:
            problems.append(f"{what} has {len(value)} characters; the limit is {self.args.max_query_chars}")

    def _params(self, body: dict, max_new_tokens: int | None, problems: list[str],
                name: str = "max_new_tokens") -> SamplingParams:
        values = {k: body[k] for k in _SAMPLING_FIELDS if body.get(k) is not None}
        if max_new_tokens is not None:
            if not 1 <= max_new_tokens <= self.args.max_new_tokens_cap:
                problems.append(f"{name} must be between 1 and {self.args.max_new_tokens_cap}, "
                                f"got {max_new_tokens}")
            values["max_new_tokens"] = max_new_tokens
        else:
            values["max_new_tokens"] = min(self.defaults.max_new_tokens, self.args.max_new_tokens_cap)
        params = SamplingParams(**{**vars(self.defaults), **values})
        problems += [p for p in params.problems() if not p.startswith("max_new_tokens")]
        return params

    def parse_chat(self, body: Any) -> tuple[str, list[dict], SamplingParams]:
        """Validate an ``/api/chat`` body; return ``(query, messages, params)``.

        Unknown fields are ignored (logged at debug level), as the original project's Flask app did; the known
        ones are checked strictly.
        """
        if isinstance(body, dict) and (unknown := [k for k in body if k not in _CHAT_FIELDS]):
            logger.debug("/api/chat: ignoring unknown fields %s", ", ".join(unknown))
            body = {k: v for k, v in body.items() if k in _CHAT_FIELDS}
        problems = _check_fields(body, _CHAT_FIELDS)
        if problems:
            raise BadRequest("; ".join(problems))
        query = body.get("query")
        if query is None or not query.strip():
            problems.append("'query' is required and must not be empty")
        else:
            self._text(query, "'query'", problems)
        history = body.get("history") or []
        if len(history) > self.args.max_history_turns:
            problems.append(f"'history' has {len(history)} turns; the limit is {self.args.max_history_turns}")
        for i, turn in enumerate(history):
            if not (isinstance(turn, list) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
                problems.append(f"'history'[{i}] must be a [user, assistant] pair of strings")
            else:
                for t in turn:
                    self._text(t, f"'history'[{i}]", problems)
        system_prompt = self.system_prompt if body.get("system_prompt") is None else body["system_prompt"]
        if system_prompt is not None:
            self._text(system_prompt, "'system_prompt'", problems)
        params = self._params(body, body.get("max_new_tokens"), problems)
        if problems:
            raise BadRequest("; ".join(problems))
        return query, chat_messages(query, history, system_prompt), params

    def parse_openai(self, body: Any) -> tuple[list[dict], SamplingParams]:
        """Validate a ``/v1/chat/completions`` body; return ``(messages, params)``."""
        problems = _check_fields(body, _OPENAI_FIELDS)
        if problems:
            raise BadRequest("; ".join(problems))
        if body.get("n") not in (None, 1):
            problems.append("only n = 1 is supported")
        for key in ("presence_penalty", "frequency_penalty"):
            if body.get(key) not in (None, 0):
                problems.append(f"only '{key}': 0 is supported (use 'repetition_penalty')")
        if body.get("stop"):
            problems.append("'stop' sequences are not supported: an answer ends at the model's end token or "
                            "at max_tokens")
        if body.get("seed") is not None:
            problems.append("'seed' is not supported: sampled answers are not reproducible per request (use "
                            "temperature 0 for the same answer every time)")
        options = body.get("stream_options") or {}
        if set(options) - {"include_usage"} or not isinstance(options.get("include_usage", False), bool):
            problems.append("'stream_options' accepts only {\"include_usage\": true|false}")
        raw = body.get("messages")
        messages = []
        if not raw:
            problems.append("'messages' is required and must not be empty")
        elif len(raw) > 2 * self.args.max_history_turns + 2:
            problems.append(f"'messages' has {len(raw)} entries; the limit is {2 * self.args.max_history_turns + 2}")
        else:
            for i, m in enumerate(raw):
                content = m.get("content") if isinstance(m, dict) else None
                if isinstance(content, list):  # content parts: only text parts can be served by a text model
                    parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
                    content = "".join(parts) if len(parts) == len(content) and all(
                        isinstance(p, str) for p in parts) else None
                if not (isinstance(m, dict) and set(m) <= {"role", "content", "name"} and isinstance(content, str)
                        and m.get("role") in ("system", "user", "assistant")):
                    problems.append(f"'messages'[{i}] must be {{\"role\": system|user|assistant, \"content\": "
                                    f"text}}")
                    continue
                self._text(content, f"'messages'[{i}].content", problems)
                messages.append({"role": m["role"], "content": content})
        if messages and not problems:
            if messages[0]["role"] != "system" and self.system_prompt is not None:
                messages.insert(0, {"role": "system", "content": self.system_prompt})
            roles = [m["role"] for m in messages if m["role"] != "system"]
            if (any(m["role"] == "system" for m in messages[1:]) or roles[-1:] != ["user"]
                    or any(r != ("user" if i % 2 == 0 else "assistant") for i, r in enumerate(roles))):
                problems.append("'messages' must be an optional system message, then user and assistant "
                                "messages in turn, ending with a user message")
        name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        params = self._params(body, body.get(name), problems, name)
        if problems:
            raise BadRequest("; ".join(problems))
        return messages, params

    # --- generation

    def submit(self, messages: list[dict], params: SamplingParams, stream: bool):
        """Start generating; return ``(request, prompt_ids, streamer or None)``."""
        streamer = (TextStreamer(self.tokenizer, skip_special_tokens=True, timeout=HEARTBEAT_S)
                    if stream else None)
        try:
            prompt_ids = encode_chat(self.tokenizer, messages)
            request = self.engine.submit(prompt_ids, params, streamer)
        except ValueError as e:
            raise BadRequest(str(e)) from None
        except EngineFull as e:
            raise BadRequest(str(e), status=503) from None
        return request, prompt_ids, streamer

    def answer(self, request, client_gone: Callable[[], bool] | None = None) -> str:
        """Wait for ``request`` and return its text; ``client_gone`` (waitress's ``waitress.client_disconnected``)
        is asked every :data:`DISCONNECT_POLL_S`: once the client has gone, the request is cancelled and
        :class:`BadRequest` (499) raised."""
        while client_gone is not None and not request.done:
            if client_gone():
                request.cancel()
                logger.info("client went away: its request was cancelled")
                raise BadRequest("the client closed the connection", status=499)
            with contextlib.suppress(TimeoutError):
                request.wait(DISCONNECT_POLL_S)
        request.wait()
        return self.tokenizer.decode(request.output_ids, skip_special_tokens=True)

    def count_tokens(self, messages: list[dict]) -> int:
        """Length of the prompt that ``messages`` become (what a request would cost before its answer)."""
        try:
            return len(encode_chat(self.tokenizer, messages))
        except ValueError as e:
            raise BadRequest(str(e)) from None

    def limits(self) -> dict:
        """What a client needs to fit a conversation in the model: context length, caps and defaults."""
        return {"model": self.model_name, "max_total_tokens": self.engine.max_total_tokens,
                "max_new_tokens_cap": self.args.max_new_tokens_cap,
                "max_new_tokens": min(self.defaults.max_new_tokens, self.args.max_new_tokens_cap),
                "temperature": self.defaults.temperature, "system_prompt": self.system_prompt,
                "max_history_turns": self.args.max_history_turns,
                "max_query_chars": self.args.max_query_chars}


# ---------------------------------------------------------------------------------------------- the app


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
        return _parse_json(raw)

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


WEB_DIR = os.path.join(os.path.dirname(__file__), "web")
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


# ---------------------------------------------------------------------------------------------- entry points


def build_service(source: ModelSource, gen_args: GenerationArguments,
                  server_args: ServerArguments) -> ChatService:
    """Check the options, load the model once, start the engine, and return the service."""
    from yak.defaults import with_default_model

    defaults = gen_args.sampling()
    problems = gen_args.problems()
    if server_args.cors_origin is not None and not _is_origin(server_args.cors_origin):
        problems.append(f"--cors_origin {server_args.cors_origin!r}: give one origin, scheme://host[:port] (e.g. "
                        "http://localhost:3000), or '*' for any")
    # at 0 every request would be refused (413, 400 or 503)
    for name in ("max_new_tokens_cap", "max_body_bytes", "max_query_chars", "max_queue", "threads",
                 "connection_limit", "idle_timeout"):
        if getattr(server_args, name) < 1:
            problems.append(f"--{name} must be at least 1, got {getattr(server_args, name)}")
    if server_args.max_history_turns < 0:
        problems.append(f"--max_history_turns must be 0 or more, got {server_args.max_history_turns}")
    if gen_args.max_new_tokens > server_args.max_new_tokens_cap:
        problems.append(f"--max_new_tokens {gen_args.max_new_tokens} is over --max_new_tokens_cap "
                        f"{server_args.max_new_tokens_cap}")
    if server_args.max_new_tokens_cap >= gen_args.max_total_tokens:
        problems.append(f"--max_new_tokens_cap {server_args.max_new_tokens_cap} leaves no room for the prompt in "
                        f"--max_total_tokens {gen_args.max_total_tokens}")
    if problems:
        raise YakError("; ".join(problems))
    source = with_default_model(source)
    model, tokenizer = load_for_inference(source, gen_args)
    engine = gen_args.build_engine(model, tokenizer, max_queue=server_args.max_queue)
    try:
        gen_args.check_room(engine.max_total_tokens)
    except YakError:
        engine.close()
        raise
    name = server_args.model_name or os.path.basename(os.path.normpath(source.base_model))
    return ChatService(engine, tokenizer, defaults, gen_args.system_prompt, server_args, name)


def _is_origin(value: str) -> bool:
    """``*``, or an origin as browsers send it: scheme://host[:port], nothing after."""
    from urllib.parse import urlsplit

    if value == "*":
        return True
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname) and not (
        parts.path or parts.query or parts.fragment or parts.username)


def app_from_config(path: str | None = None):
    """App factory for production WSGI servers: one YAML/JSON file with the options of ``serve_demo.py``.

    Args:
        path: the config file; default: the ``YAK_SERVE_CONFIG`` environment variable.
    """
    from yak.cli import parse_args

    path = path or os.environ.get(CONFIG_ENV)
    if not path:
        raise YakError(f"give the config file as app_from_config('serve.yaml') or in ${CONFIG_ENV}")
    source, gen_args, server_args = parse_args([ModelSource, GenerationArguments, ServerArguments], [path])
    return create_app(build_service(source, gen_args, server_args))


def page_url(host: str, port: int) -> str:
    """The address to open for the chat page (a wildcard bind is opened through the loopback)."""
    host = {"0.0.0.0": "127.0.0.1", "::": "[::1]", "": "127.0.0.1"}.get(host, host)
    return f"http://{'[' + host + ']' if ':' in host and not host.startswith('[') else host}:{port}/"


def make_server(app, sock: socket.socket, args: ServerArguments, connections: dict | None = None):
    """The waitress server of ``app`` on the bound socket ``sock`` (which it then owns), with the limits of ``args``.

    werkzeug's development server started a thread per connection without a cap and never closed an idle one.
    Here one event loop holds the open connections (at most ``--connection_limit``, closed after
    ``--idle_timeout`` s without a request) and ``--threads`` threads serve requests. Streamed writes leave at
    once (``send_bytes=1``; waitress gathers 18 kB otherwise); a connection is read while its request runs
    (``channel_request_lookahead``), so a client that goes away is seen, streaming or not. ``connections`` is
    the event loop's socket map: ``waitress.wasyncore.loop(map=connections)`` runs it (``server.run()`` too,
    but returns normally on SIGTERM and Ctrl-C).
    """
    from waitress.server import create_server

    return create_server(
        app, map={} if connections is None else connections, sockets=[sock], threads=args.threads,
        connection_limit=args.connection_limit, channel_timeout=args.idle_timeout,
        cleanup_interval=max(1, min(30, args.idle_timeout // 2)), send_bytes=1, channel_request_lookahead=1,
        # waitress reads a whole body before the app sees it: bounded here, refused by the app as JSON up to
        # twice the limit (beyond, waitress's own plain-text 413)
        max_request_body_size=2 * args.max_body_bytes, asyncore_use_poll=True, ident="yak")


def serve(source: ModelSource, gen_args: GenerationArguments, server_args: ServerArguments) -> None:
    """Load the model and serve until interrupted, on waitress (:func:`make_server`)."""
    from waitress import wasyncore

    if not 0 <= server_args.port < 65536:
        raise YakError(f"--port must be in 0..65535 (0: a free port), got {server_args.port}")
    # Bind first: a busy port fails at once, not after minutes of model loading.
    try:
        family = socket.AF_INET6 if ":" in server_args.host else socket.AF_INET
        sock = socket.create_server((server_args.host, server_args.port), family=family)
    except OSError as e:
        raise YakError(f"cannot listen on {server_args.host}:{server_args.port} ({e.strerror}); choose another "
                       "--port (or --host), or stop the program that uses it") from None
    try:
        service = build_service(source, gen_args, server_args)
    except BaseException:
        sock.close()
        raise
    connections: dict = {}
    server = make_server(create_app(service), sock, server_args, connections)
    if server_args.threads < gen_args.max_batch_size:
        logger.warning("--threads %d is below --max_batch_size %d: batches never fill", server_args.threads,
                       gen_args.max_batch_size)
    if server_args.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("listening on %s: the server is reachable from other machines and has no authentication",
                       server_args.host)
    logger.info("serving %s on %s (POST /api/chat, /v1/chat/completions; GET /health)",
                service.model_name, page_url(server_args.host, server.effective_port))
    if not server_args.no_web_ui:
        logger.info("chat page: open %s in a browser", page_url(server_args.host, server.effective_port))
    # waitress's server.run() returns normally on SIGTERM (run_main's SystemExit) and Ctrl-C; its loop, run
    # here, lets them end the script with their exit status.
    try:
        wasyncore.loop(timeout=1.0, map=connections, use_poll=True)
    finally:
        service.engine.close()  # running requests end (streams too), so the threads finish
        server.task_dispatcher.shutdown(timeout=2)
