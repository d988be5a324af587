"""Generation: prompts from the chat template, per-request sampling, and a continuous-batching engine.

A module per concern, each importing only from those above it:

- :mod:`yak.generation.sampling`: ``SamplingParams`` and the pick of the next token (``sample_next``).
- :mod:`yak.generation.prompts`: ``chat_messages``, ``encode_chat``, ``encode_raw``, ``stop_token_ids``.
- :mod:`yak.generation.request`: ``Request``, ``EngineFull``, ``TextStreamer``.
- :mod:`yak.generation.cache`: the engine's per-slot KV cache.
- :mod:`yak.generation.engine`: ``Engine`` (continuous batching, CUDA graphs).
- :mod:`yak.generation.arguments`: ``GenerationArguments``, ``InferenceArguments`` (the model is a
  :class:`yak.source.ModelSource`).
- :mod:`yak.generation.loading`: ``load_for_inference``.
- :mod:`yak.generation.inference`: ``inference_hf.py``'s modes (``run_inference``).

``inference_hf.py`` and ``serve_demo.py`` use the entry points re-exported here.
"""

from yak.generation.arguments import GenerationArguments, InferenceArguments
from yak.generation.inference import run_inference

__all__ = ["GenerationArguments", "InferenceArguments", "run_inference"]
