"""HTTP serving: a Flask app factory with ``/api/chat``, OpenAI-compatible ``/v1/chat/completions``, ``/health``,
and the chat page at ``/`` (files in ``yak/web/``).

One model per process: the app holds one :class:`yak.generation.engine.Engine`, whose worker batches all concurrent
requests together. Every request body is checked before it reaches the model: size, UTF-8, JSON, known
fields only, types, ranges, lengths; a bad request gets a 4xx JSON error and the server keeps serving.
Errors look like OpenAI's (``{"error": {"message", "type", "code"}}``) so OpenAI clients report them well.

A module per concern, each importing only from those above it:

- :mod:`yak.server.validation`: ``ServerArguments``, ``BadRequest`` and the checks of a request body.
- :mod:`yak.server.service`: ``ChatService`` (checked requests in, engine requests and answers out).
- :mod:`yak.server.app`: the Flask app and its routes (``create_app``).
- :mod:`yak.server.serve`: ``build_service``, ``app_from_config``, ``make_server``, ``serve``.
"""

from yak.server.app import create_app
from yak.server.serve import app_from_config, build_service, make_server, page_url, serve
from yak.server.service import ChatService
from yak.server.validation import BadRequest, ServerArguments

__all__ = ["BadRequest", "ChatService", "ServerArguments", "app_from_config", "build_service", "create_app",
           "make_server", "page_url", "serve"]
