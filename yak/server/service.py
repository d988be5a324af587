"""The chat service: turn checked requests into engine requests, and answer them."""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable

from yak.generation.engine import Engine
from yak.generation.prompts import chat_messages, encode_chat
from yak.generation.request import EngineFull, TextStreamer
from yak.generation.sampling import SamplingParams
from yak.server.validation import (
    CHAT_FIELDS,
    OPENAI_FIELDS,
    SAMPLING_FIELDS,
    BadRequest,
    ServerArguments,
    check_fields,
)

logger = logging.getLogger(__package__)  # "yak.server", the name its log lines have always shown

# While a stream has no new text (waiting in the queue, or text the streamer holds back until a word ends), an
# SSE comment goes out this often: a server notices that its client went away only when a write fails, and the
# generation is then cancelled.
HEARTBEAT_S = 0.5
# While a non-streaming answer is generated, whether its client is still connected is asked this often (under
# waitress); a client that went away cancels its request, which frees its batch slot.
DISCONNECT_POLL_S = 0.25


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
        values = {k: body[k] for k in SAMPLING_FIELDS if body.get(k) is not None}
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
        if isinstance(body, dict) and (unknown := [k for k in body if k not in CHAT_FIELDS]):
            logger.debug("/api/chat: ignoring unknown fields %s", ", ".join(unknown))
            body = {k: v for k, v in body.items() if k in CHAT_FIELDS}
        problems = check_fields(body, CHAT_FIELDS)
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
        problems = check_fields(body, OPENAI_FIELDS)
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
