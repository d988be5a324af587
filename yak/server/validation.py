"""What a request may be: the server's limits (``ServerArguments``), the fields each endpoint accepts, and
the checks of a body (JSON, UTF-8, known fields, types) before it reaches the model."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any


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


NUMBER = (int, float)
# field -> (accepted types, type name for messages); bool is rejected where a number is expected.
SAMPLING_FIELDS = {
    "temperature": (NUMBER, "a number"),
    "top_p": (NUMBER, "a number"),
    "top_k": ((int,), "an integer"),
    "repetition_penalty": (NUMBER, "a number"),
}
CHAT_FIELDS = {
    "query": ((str,), "a string"),
    "history": ((list,), "a list of [user, assistant] pairs"),
    "system_prompt": ((str,), "a string"),
    "max_new_tokens": ((int,), "an integer"),
    "stream": ((bool,), "true or false"),
    **SAMPLING_FIELDS,
}
OPENAI_FIELDS = {
    "model": ((str,), "a string"),
    "messages": ((list,), "a list of messages"),
    "max_tokens": ((int,), "an integer"),
    "max_completion_tokens": ((int,), "an integer"),
    "stream": ((bool,), "true or false"),
    "stream_options": ((dict,), "an object"),
    "n": ((int,), "an integer"),
    "user": ((str,), "a string"),
    # accepted at their neutral values, which OpenAI-style tools often send; anything else is refused
    "presence_penalty": (NUMBER, "a number"),
    "frequency_penalty": (NUMBER, "a number"),
    "stop": ((str, list), "a string or a list of strings"),
    "seed": ((int,), "an integer"),
    **SAMPLING_FIELDS,
}


def check_fields(body: Any, spec: dict) -> list[str]:
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


def parse_json(raw: bytes) -> Any:
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
