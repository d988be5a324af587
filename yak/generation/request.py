"""One generation request as the engine and its callers share it, and the streamer that receives its text."""

from __future__ import annotations

import queue
import threading
from typing import Callable, Sequence

import torch
from transformers import TextStreamer as _TransformersTextStreamer

from yak.generation.sampling import SamplingParams


class TextStreamer(_TransformersTextStreamer):
    """Streams an answer's text to a reader thread, Tibetan syllable by syllable; iterate over it to read.

    The engine's thread only queues token ids (:meth:`put`); the reader decodes them when it asks for the next
    piece, with transformers' incremental rules (``TextStreamer.put``), all ids that came since at once. So the
    decoding, which re-decodes the text since the last line break, costs the reader's thread, not the thread
    that decodes every request of the batch (transformers' ``TextIteratorStreamer`` decodes in ``put``).

    transformers sends text that ends in a CJK character at once, but holds text with punctuation back until
    the next space, in case a later token changes it. A Tibetan syllable ends in a tsheg (a punctuation mark)
    and Tibetan puts a space only after a shad, so answers came a sentence at a time. Text that ends in a
    Tibetan character (U+0F00-U+0FFF) is as complete as text that ends in a CJK character: nothing after it
    changes it, so it is sent at once too.

    Args:
        tokenizer: decodes the ids.
        timeout: seconds :meth:`__next__` waits for ids before it raises ``queue.Empty`` (``None``: forever).
        decode_kwargs: for ``tokenizer.decode`` (e.g. ``skip_special_tokens=True``).
    """

    def __init__(self, tokenizer, timeout: float | None = None, **decode_kwargs):
        super().__init__(tokenizer, **decode_kwargs)
        self.timeout = timeout
        self._ids: queue.SimpleQueue[torch.Tensor | None] = queue.SimpleQueue()  # None: the answer ended
        self._text: list[str] = []  # what transformers' rules release while the reader decodes
        self._ended = False

    def put(self, value: torch.Tensor) -> None:
        """Called by the engine with each new token id."""
        self._ids.put(value)

    def end(self) -> None:
        """Called by the engine when the answer is complete (or failed, or was cancelled)."""
        self._ids.put(None)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self._text.append(text)

    def __iter__(self) -> TextStreamer:
        return self

    def __next__(self) -> str:
        """The text of the ids that came since the last call; ``""`` while a word is held back.

        Raises:
            queue.Empty: no id came within ``timeout``.
            StopIteration: the answer ended and all its text was returned.
        """
        if self._ended:
            raise StopIteration
        items = [self._ids.get(timeout=self.timeout)]
        while not self._ids.empty():
            items.append(self._ids.get())
        ids = [t for item in items if item is not None for t in item.reshape(-1).tolist()]
        if ids:
            super().put(torch.tensor(ids))
        if items[-1] is None:
            super().end()
            self._ended = True
        text, self._text = "".join(self._text), []
        if self._ended and not text:
            raise StopIteration
        return text

    def _is_chinese_char(self, cp: int) -> bool:
        return 0x0F00 <= cp <= 0x0FFF or super()._is_chinese_char(cp)


class Request:
    """One generation request: its prompt, settings, and (as they come) its tokens.

    Args:
        prompt_ids: the prompt's token ids.
        params: its sampling settings.
        streamer: optional object with ``put(tensor)`` / ``end()`` (e.g. :class:`TextStreamer` or transformers'
            ``TextIteratorStreamer``) that receives each generated token as it comes.
    """

    def __init__(self, prompt_ids: Sequence[int], params: SamplingParams, streamer=None):
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.streamer = streamer
        self.output_ids: list[int] = []
        self.finish_reason: str | None = None  # "stop" (end token), "length" (max_new_tokens), "cancelled"
        self.error: BaseException | None = None
        self._done = threading.Event()
        self._cancelled = False
        self._on_cancel: Callable[[Request], None] | None = None  # set by the engine that queues it

    def cancel(self) -> None:
        """Stop this request (e.g. its client went away): a waiting one leaves the engine's queue at once, a
        running one frees its batch slot at the next decode step."""
        self._cancelled = True
        if self._on_cancel is not None:
            self._on_cancel(self)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> "Request":
        """Block until finished; re-raise the engine's error if the request failed."""
        if not self._done.wait(timeout):
            raise TimeoutError("generation did not finish in time")
        if self.error is not None:
            raise RuntimeError(f"generation failed: {self.error}") from self.error
        return self

    def _emit(self, token: int) -> None:
        self.output_ids.append(token)
        if self.streamer is not None:
            self.streamer.put(torch.tensor([token]))

    def _finish(self, reason: str | None, error: BaseException | None = None) -> None:
        self.finish_reason, self.error = reason, error
        if self.streamer is not None:
            self.streamer.end()
        self._done.set()


class EngineFull(Exception):
    """The engine's queue is full; try again later."""
