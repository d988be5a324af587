"""SentencePiece models and the merge of pieces: read a ``ModelProto``, append a new script's pieces to a
Llama-family BPE base so that each one is reachable, and keep the new model's merged pieces alone.

Why not the usual recipe (append the new pieces to Llama's ``ModelProto`` with score 0): SentencePiece BPE
encodes by starting from characters and repeatedly merging the adjacent pair whose concatenation is a
vocabulary piece with the highest score (ties: leftmost pair). So

- an appended piece is produced only if a chain of such merges builds it. BPE pieces appended in training
  order with strictly decreasing scores are reachable when every character they use is itself a piece;
  every added piece is checked by encoding its text, and unreachable ones are replaced;
- score-0 appends tie with each other, and the tokenizers-backed ("fast") conversion breaks ties
  differently from SentencePiece ("slow"), so the two disagree on most Tibetan lines. Distinct float32
  scores, below every base score, give one total merge order that both follow; the export checks it;
- only pieces made of characters of the configured script (optionally with a leading ``▁``) are added, so
  text without those characters encodes exactly as with the base tokenizer.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from yak import YakError
from yak.tokenizer.corpus import in_script

WORD_BOUNDARY = "▁"  # SentencePiece's escaped space
# SentencePiece piece types (sentencepiece_model.proto: ModelProto.SentencePiece.Type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


# ------------------------------------------------------------------------------------ SentencePiece models
def model_proto():
    """An empty SentencePiece ``ModelProto``."""
    from sentencepiece import sentencepiece_model_pb2

    return sentencepiece_model_pb2.ModelProto()


def load_sp_model(path: str | os.PathLike, option: str = "--base_tokenizer"):
    """Read a SentencePiece ``ModelProto`` from ``tokenizer.model`` or a folder holding one.

    Args:
        path: the file or folder.
        option: the option name used in error messages.
    """
    from google.protobuf.message import DecodeError

    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.model"
    if not p.is_file():
        raise YakError(f"{option}: {p} does not exist; give a SentencePiece tokenizer.model or its folder")
    proto = model_proto()
    try:
        proto.ParseFromString(p.read_bytes())
    except DecodeError:
        proto.Clear()
    if not proto.pieces:
        raise YakError(f"{option}: {p} is not a SentencePiece model (it holds no pieces)")
    return proto


# -------------------------------------------------------------------------------------------------- merge
def sp_processor(proto, add_dummy_prefix: bool | None = None):
    """A ``SentencePieceProcessor`` for ``proto``, optionally with ``add_dummy_prefix`` changed."""
    import sentencepiece as spm

    if add_dummy_prefix is not None and proto.normalizer_spec.add_dummy_prefix != add_dummy_prefix:
        proto = type(proto).FromString(proto.SerializeToString())
        proto.normalizer_spec.add_dummy_prefix = add_dummy_prefix
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


def unreachable_pieces(proto, pieces: Sequence[str]) -> list[str]:
    """Return the pieces of ``pieces`` that the model ``proto`` does not produce from their own text.

    A piece ``▁x`` must encode from ``x`` (the dummy prefix supplies the boundary); a piece ``x`` from ``x``
    with no dummy prefix; other ``▁`` are spaces.

    Args:
        proto: a SentencePiece ``ModelProto``.
        pieces: pieces of ``proto`` to check.
    """
    with_prefix, without_prefix = sp_processor(proto, True), sp_processor(proto, False)
    bad = []
    for piece in pieces:
        text = piece.replace(WORD_BOUNDARY, " ")
        if piece.startswith(WORD_BOUNDARY):
            got = with_prefix.encode(text[1:], out_type=str)
        else:
            got = without_prefix.encode(text, out_type=str)
        if got != [piece]:
            bad.append(piece)
    return bad


def _addable(piece: str, ranges) -> bool:
    # Word boundaries may sit anywhere (pieces across "། " when whitespace splitting is off); at least one
    # character of the script makes sure text without the script never reaches the piece.
    return in_script(piece.replace(WORD_BOUNDARY, ""), ranges)


def script_characters(ranges) -> list[str]:
    """The assigned characters (Unicode general category not Cn) of ``ranges``."""
    import unicodedata

    return [chr(c) for lo, hi in ranges for c in range(lo, hi + 1) if unicodedata.category(chr(c)) != "Cn"]


def _candidates(source, base_pieces: set[str], ranges, all_characters: bool) -> list[str]:
    """The source model's addable pieces, characters first, then by decreasing score (= BPE order)."""
    normal = [p for p in source.pieces if p.type in (NORMAL, USER_DEFINED) and _addable(p.piece, ranges)]
    normal.sort(key=lambda p: -p.score)  # stable: keeps BPE training order
    chars = {c for p in normal for c in p.piece if c != WORD_BOUNDARY}
    chars = sorted(chars.union(script_characters(ranges)) if all_characters else chars)
    out, seen = [], set(base_pieces)
    for piece in chars + [p.piece for p in normal]:
        if piece not in seen:
            seen.add(piece)
            out.append(piece)
    return out


def merge_pieces(base, source, num_pieces: int, ranges, all_characters: bool = True
                 ) -> tuple[object, list[str], int]:
    """Append up to ``num_pieces`` reachable pieces of ``source`` to a copy of ``base``.

    The characters of the added pieces come first, then the pieces in ``source``'s score order; each gets a
    distinct float32 score below every base score. First the candidates that stay unreachable with all
    candidates in are dropped (Unigram pieces, mostly), then the first ``num_pieces`` of the rest are taken,
    and any that a missing later piece leaves unreachable are replaced by the next ones.

    Args:
        base: the base ``ModelProto`` (SentencePiece BPE).
        source: the new script's ``ModelProto`` (BPE or Unigram).
        num_pieces: how many pieces to add.
        ranges: the script's code point ranges.
        all_characters: add every assigned character of ``ranges`` too.

    Returns:
        ``(merged ModelProto, added pieces, number of candidates dropped as unreachable)``.
    """
    pool = _candidates(source, {p.piece for p in base.pieces}, ranges, all_characters)
    _, reachable = _fill(base, pool, len(pool))
    merged, added = _fill(base, reachable, num_pieces)
    kept = set(added)
    return merged, added, len(pool) - len(reachable) + sum(p not in kept for p in reachable[:len(added)])


def _fill(base, pool: Sequence[str], num_pieces: int) -> tuple[object, list[str]]:
    """Append the first ``num_pieces`` pieces of ``pool`` that are reachable together (see merge_pieces)."""
    floor = np.float32(min(p.score for p in base.pieces))
    chosen, next_candidate = [], 0
    while True:
        while len(chosen) < num_pieces and next_candidate < len(pool):
            chosen.append(pool[next_candidate])
            next_candidate += 1
        merged = type(base).FromString(base.SerializeToString())
        score = floor
        for piece in chosen:
            score = np.nextafter(score, np.float32(-np.inf), dtype=np.float32)
            merged.pieces.add(piece=piece, score=float(score), type=NORMAL)
        bad = set(unreachable_pieces(merged, chosen))
        if not bad:
            return merged, chosen
        chosen = [p for p in chosen if p not in bad]


def restrict_source(source, added: Sequence[str], ranges):
    """The new script's model with only the script pieces that were merged (and every character kept).

    Saved beside the merged tokenizer, it encodes script text as the merged tokenizer's pieces would alone,
    and merging it again (``--tibetan_sp_model``) gives the same tokenizer.

    Args:
        source: the new script's ``ModelProto``.
        added: the pieces merged into the base.
        ranges: the script's code point ranges.
    """
    keep = set(added)
    out = type(source).FromString(source.SerializeToString())
    del out.pieces[:]
    for p in source.pieces:
        bare = p.piece.replace(WORD_BOUNDARY, "")
        if p.type != NORMAL or not _addable(p.piece, ranges) or p.piece in keep or len(bare) == 1:
            out.pieces.append(p)
    out.trainer_spec.vocab_size = len(out.pieces)
    return out
