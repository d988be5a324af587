"""Metrics that do not depend on the model's vocabulary, so models with different tokenizers compare fairly.

Bits per UTF-8 byte / per character (not per token), accuracy over label or option likelihoods, sacrebleu's
chrF++ and BLEU on detokenised text, and exact match / F1 over Tibetan syllables (or words elsewhere).
"""

from __future__ import annotations

import math
import re
from collections import Counter

import sacrebleu


def bits_per_unit(nll_nats: float, n_units: int) -> float:
    """Total negative log-likelihood (natural log) spread over ``n_units`` bytes or characters, in bits."""
    return nll_nats / math.log(2) / n_units


def accuracy(predictions: list[int], golds: list[int]) -> float:
    """Fraction of ``predictions`` equal to ``golds``."""
    assert len(predictions) == len(golds) and golds
    return sum(p == g for p, g in zip(predictions, golds)) / len(golds)


def chrf_pp(hypotheses: list[str], references: list[str]) -> float:
    """Corpus chrF++ (character n-grams up to 6 plus word n-grams up to 2), sacrebleu's implementation."""
    return sacrebleu.CHRF(word_order=2).corpus_score(hypotheses, [references]).score


def bleu(hypotheses: list[str], references: list[str], tokenize: str = "13a") -> float:
    """Corpus BLEU from sacrebleu; use ``tokenize="zh"`` for Chinese references."""
    return sacrebleu.BLEU(tokenize=tokenize).corpus_score(hypotheses, [references]).score


# Tibetan syllables end at a tsheg (U+0F0B, U+0F0C) or at punctuation (shad and the like, U+0F0D-U+0F14)
# or whitespace; non-Tibetan text falls back to whitespace words. Punctuation is dropped, as SQuAD drops it.
_SEPARATORS = re.compile(r"[\s\u0f0b\u0f0c\u0f0d-\u0f14\u0f34\u0f3a-\u0f3d]+")
_PUNCT = re.compile(r"[^\w\u0f00-\u0fff]+")


def syllables(text: str) -> list[str]:
    """Syllables of Tibetan text (words of other text), lower-cased, without punctuation."""
    out = []
    for piece in _SEPARATORS.split(text.lower()):
        piece = _PUNCT.sub("", piece)
        if piece and not re.fullmatch(r"[\u0f00-\u0f0a]+", piece):  # head marks like ༄༅ are not syllables
            out.append(piece)
    return out


def exact_match(prediction: str, reference: str) -> float:
    """1.0 if the two have the same syllables in the same order (punctuation and spacing ignored)."""
    return float(syllables(prediction) == syllables(reference))


def f1_syllables(prediction: str, reference: str) -> float:
    """SQuAD-style F1 over the multisets of syllables of ``prediction`` and ``reference``."""
    pred, ref = syllables(prediction), syllables(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)
