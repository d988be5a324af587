"""One generation request as the engine and its callers share it, and the streamer that receives its text."""

from __future__ import annotations

import threading
from typing import Sequence

import torch
from transformers import TextIteratorStreamer

from yak.generation.sampling import SamplingParams


class TextStreamer(TextIteratorStreamer):
    """transformers' ``TextIteratorStreamer``, streaming Tibetan syllable by syllable instead of by sentence.

    transformers sends text that ends in a CJK character at once, but holds text with punctuation back until
    the next space, in case a later token changes it. A Tibetan syllable ends in a tsheg (a punctuation mark)
    and Tibetan puts a space only after a shad, so answers came a sentence at a time. Text that ends in a
    Tibetan character (U+0F00-U+0FFF) is as complete as text that ends in a CJK character: nothing after it
    changes it, so it is sent at once too.
    """

    def _is_chinese_char(self, cp: int) -> bool:
        return 0x0F00 <= cp <= 0x0FFF or super()._is_chinese_char(cp)


class Request:
    """One generation request: its prompt, settings, and (as they come) its tokens.

    Args:
        prompt_ids: the prompt's token ids.
        params: its sampling settings.
        streamer: optional object with ``put(tensor)`` / ``end()`` (e.g. transformers'
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

    def cancel(self) -> None:
        """Ask the engine to stop this request (e.g. its client went away)."""
        self._cancelled = True

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
