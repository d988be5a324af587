"""Serve a Yak model over HTTP: POST /api/chat ({"query": ...} -> {"query": ..., "output": ...}, or server-sent
events with "stream": true), the OpenAI-compatible POST /v1/chat/completions (with "stream"), GET /v1/models and
GET /health. Binds 127.0.0.1:8718 unless --host/--port say otherwise (--port 0: a free port; the address is
printed); without --base_model it serves the newest merged output of the shipped pipeline, else the shipped
tiny model (the log says which). --cors_origin lets web pages of another origin call it. The model loads once
and concurrent requests are decoded together in one batch. Request size, query and history length and
max_new_tokens are bounded. Runs on waitress (bounded --threads and --connection_limit, --idle_timeout;
docs/serving.md).
A chat page for the browser is served at GET / (its address is printed at start; --no_web_ui turns it off).
"""

from yak.cli import parse_args, run_main, setup_logging
from yak.generation import GenerationArguments
from yak.server import ServerArguments, serve
from yak.source import ModelSource


@run_main
def main() -> None:
    setup_logging()
    source, gen_args, server_args = parse_args(
        [ModelSource, GenerationArguments, ServerArguments], description=__doc__
    )
    serve(source, gen_args, server_args)


if __name__ == "__main__":
    main()
