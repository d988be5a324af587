"""The server's entry points: build the service (load the model once), the app factory for gunicorn or
waitress (``app_from_config``), and ``serve`` (``serve_demo.py``) under waitress."""

from __future__ import annotations

import logging
import os
import socket

from yak import YakError
from yak.generation.arguments import GenerationArguments
from yak.generation.loading import load_for_inference
from yak.server.app import create_app
from yak.server.service import ChatService
from yak.server.validation import ServerArguments
from yak.source import ModelSource

logger = logging.getLogger(__package__)  # "yak.server", the name its log lines have always shown

CONFIG_ENV = "YAK_SERVE_CONFIG"


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
