"""Per-request sampling: the settings of one request and the pick of each row's next token."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

# Sampling runs in float32: a temperature below this decodes greedily (as in vLLM), since dividing the logits by
# it would overflow to inf (1e-45 is 0 in float32) and fail the whole batch; a repetition penalty below this
# bound does the same by dividing the logits by it.
MIN_TEMPERATURE = 1e-5
MIN_REPETITION_PENALTY = 0.01


@dataclass
class SamplingParams:
    """How one request is decoded. ``temperature == 0`` means greedy decoding.

    Args:
        max_new_tokens: generated tokens at most (the prompt does not count).
        temperature: softmax temperature; 0 (or below ``MIN_TEMPERATURE``) picks the most likely token (greedy).
        top_p: nucleus sampling: keep the smallest set of tokens whose probability reaches ``top_p`` (1 = off).
        top_k: keep the ``top_k`` most likely tokens (0 = off).
        repetition_penalty: divide the logits of tokens already in the sequence (CTRL paper; 1 = off).
    """

    max_new_tokens: int = 400
    temperature: float = 0.2
    top_p: float = 0.9
    top_k: int = 40
    repetition_penalty: float = 1.1

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    def problems(self) -> list[str]:
        """Return what is out of range, one sentence per field (empty when valid)."""
        out = []
        if self.max_new_tokens < 1:
            out.append(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not 0 <= self.temperature <= 100:
            out.append(f"temperature must be in [0, 100] (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            out.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            out.append(f"top_k must be 0 (off) or positive, got {self.top_k}")
        if not MIN_REPETITION_PENALTY <= self.repetition_penalty <= 10:
            out.append(f"repetition_penalty must be in [{MIN_REPETITION_PENALTY}, 10], got {self.repetition_penalty}")
        return out


def penalise_repeats(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """Apply the repetition penalty (CTRL paper, as ``generate``): seen tokens' logits are divided by the penalty
    when positive, multiplied when negative.

    Args:
        logits: ``(B, V)`` float logits.
        seen: ``(B, T)`` ids already in each row's sequence (repeats are harmless).
        penalty: ``(B, 1)`` each row's penalty; 1 leaves the row unchanged.
    """
    score = logits.gather(1, seen)
    return logits.scatter(1, seen, torch.where(score < 0, score * penalty, score / penalty))


def sample_next(logits: torch.Tensor, params: Sequence[SamplingParams], seen: torch.Tensor | None) -> torch.Tensor:
    """Pick one token per row with each row's own settings, in ``generate``'s order of processors.

    Args:
        logits: ``(B, V)`` next-token logits.
        params: one :class:`SamplingParams` per row.
        seen: ``(B, T)`` ids already in each row's sequence (for the repetition penalty), or ``None``.

    Returns:
        ``(B,)`` token ids.
    """
    logits = logits.float()
    dev = logits.device
    penalties = [p.repetition_penalty for p in params]
    if seen is not None and any(r != 1.0 for r in penalties):
        logits = penalise_repeats(logits, seen, torch.tensor(penalties, device=dev)[:, None])
    greedy = logits.argmax(-1)  # (B,)
    if all(p.greedy for p in params):
        return greedy
    temp = torch.tensor([1.0 if p.greedy else p.temperature for p in params], device=dev)[:, None]
    logits = logits / temp
    sorted_logits, order = logits.sort(-1, descending=True)  # (B, V)
    vocab = logits.shape[-1]
    k = torch.tensor([min(p.top_k, vocab) or vocab for p in params], device=dev)[:, None]
    ranks = torch.arange(vocab, device=dev)[None, :]
    drop = ranks >= k
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
    top_p = torch.tensor([p.top_p for p in params], device=dev)[:, None]
    # Drop a token when the tokens ranked above it already reach top_p; the first token always stays (also when
    # a tiny top_p is 0 in float32).
    drop |= (probs.cumsum(-1) - probs) >= top_p
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    choice = torch.multinomial(sorted_logits.softmax(-1), 1)  # (B, 1) ranks
    sampled = order.gather(1, choice)[:, 0]
    is_greedy = torch.tensor([p.greedy for p in params], device=dev)
    return torch.where(is_greedy, greedy, sampled)
