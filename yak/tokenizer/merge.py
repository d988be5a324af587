"""Tokenizer stage: train a SentencePiece model on a script's text, merge it into a Llama-family BPE model,
export matching slow (SentencePiece) and fast (Hugging Face tokenizers) files, and measure them.

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

import codecs
import io
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from yak import YakError
from yak.formats import check_tokenizer_files
from yak.outdir import inputs_inside, output_dir_problems, replace_dir
from yak.template import LLAMA2_CHAT_TEMPLATE

logger = logging.getLogger(__name__)

SP_DIR = "merged_tokenizer_sp"
HF_DIR = "merged_tokenizer_hf"
SOURCE_DIR = "new_script_sp"  # the trained new-script model alone, kept for --tibetan_sp_model and the report
TIBETAN_RANGES = "0F00-0FFF"
WORD_BOUNDARY = "▁"  # SentencePiece's escaped space
# SentencePiece piece types (sentencepiece_model.proto: ModelProto.SentencePiece.Type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# A sentence is split after a shad (།) followed by whitespace: Tibetan documents are single long lines and
# SentencePiece silently drops training lines longer than max_sentence_length.
_SENTENCE_END = re.compile(r"(?<=།)\s+")


# ----------------------------------------------------------------------------------------------- arguments
@dataclass
class TokenizerArguments:
    """Options of ``merge_tokenizer.py`` (names follow SentencePiece's trainer where they map to it)."""

    corpus: list[str] = field(
        default_factory=list,
        metadata={"help": "Text files or folders of *.txt files (UTF-8) in the new script, to train on."},
    )
    base_tokenizer: str = field(
        default="tokenizer/llama2",
        metadata={"help": "The base Llama-family SentencePiece BPE tokenizer: a tokenizer.model file or a "
                          "folder holding one."},
    )
    output_dir: str = field(
        default="merged_tokenizer",
        metadata={"help": f"Output folder; receives {SP_DIR}/tokenizer.model, {HF_DIR}/ and {SOURCE_DIR}/ (the "
                          "trained new-script model alone, when one is trained)."},
    )
    model_type: str = field(
        default="bpe",
        metadata={"help": "SentencePiece algorithm of the new model.", "choices": ["bpe", "unigram"]},
    )
    num_pieces: int = field(
        default=20000,
        metadata={"help": "Number of pieces to add to the base vocabulary (all of them reachable)."},
    )
    vocab_size: int = field(
        default=0,
        metadata={"help": "Size of the new SentencePiece model (0: a twentieth more than --num_pieces, as "
                          "pieces outside the script or already in the base are skipped). Set it for Unigram,"
                          " whose pieces are often unreachable."},
    )
    tibetan_sp_model: str | None = field(
        default=None,
        metadata={"help": "Merge this existing SentencePiece model instead of training one (then --corpus is "
                          "used only to check the result, and may be empty)."},
    )
    script_ranges: str = field(
        default=TIBETAN_RANGES,
        metadata={"help": "Unicode ranges of the new script, e.g. '0F00-0FFF' or '0F00-0FFF,0020-0020'; only "
                          "pieces made of these characters (and word boundaries) are added."},
    )
    script_characters: bool = field(
        default=True,
        metadata={"help": "Add every assigned character of --script_ranges, not only those of the new model, "
                          "so that rare ones do not fall back to bytes (turn off for scripts of thousands of "
                          "characters)."},
    )
    max_sentencepiece_length: int = field(
        default=16, metadata={"help": "Longest piece, in characters (SentencePiece trainer option)."}
    )
    character_coverage: float = field(
        default=1.0, metadata={"help": "Share of characters the new model covers (SentencePiece option)."}
    )
    input_sentence_size: int = field(
        default=0, metadata={"help": "Train on at most this many sentences, sampled (0: all)."}
    )
    max_sentence_length: int = field(
        default=8192,
        metadata={"help": "Sentences longer than this many bytes are cut (at a tsheg) before training, "
                          "instead of being dropped silently by SentencePiece."},
    )
    split_by_whitespace: bool = field(
        default=False,
        metadata={"help": "Do not learn pieces across spaces (SentencePiece option). Off by default: Tibetan "
                          "marks words with tshegs, not spaces, and pieces across '། ' shorten classical "
                          "text by about one percent."},
    )
    seed: int = field(default=42, metadata={"help": "Seed for SentencePiece's sentence sampling."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing output folder."})


# ------------------------------------------------------------------------------------------ script ranges
def parse_script_ranges(spec: str) -> list[tuple[int, int]]:
    """Parse ``"0F00-0FFF,1000-109F"`` into ``[(0x0F00, 0x0FFF), (0x1000, 0x109F)]``.

    Args:
        spec: comma-separated hexadecimal code point ranges ``START-END`` (or single code points).
    """
    ranges = []
    for part in spec.split(","):
        lo, _, hi = part.strip().partition("-")
        try:
            start, end = int(lo, 16), int(hi or lo, 16)
        except ValueError:
            raise YakError(f"--script_ranges: cannot read {part!r}; write hexadecimal ranges like 0F00-0FFF")
        if not 0 <= start <= end <= 0x10FFFF:
            raise YakError(f"--script_ranges: {part!r} is not a valid code point range")
        ranges.append((start, end))
    if not ranges:
        raise YakError("--script_ranges is empty; give at least one range like 0F00-0FFF")
    return ranges


def in_script(text: str, ranges: Sequence[tuple[int, int]]) -> bool:
    """True if every character of ``text`` (non-empty) lies in ``ranges``."""
    return bool(text) and all(any(lo <= ord(c) <= hi for lo, hi in ranges) for c in text)


def has_script(text: str, ranges: Sequence[tuple[int, int]]) -> bool:
    """True if some character of ``text`` lies in ``ranges``."""
    return any(any(lo <= ord(c) <= hi for lo, hi in ranges) for c in text)


def script_pattern(ranges: Sequence[tuple[int, int]]) -> re.Pattern:
    """A regular expression for one maximal run of characters of ``ranges``."""
    return re.compile("[" + "".join(f"\\U{lo:08x}-\\U{hi:08x}" for lo, hi in ranges) + "]+")


def _addable(piece: str, ranges) -> bool:
    # Word boundaries may sit anywhere (pieces across "། " when whitespace splitting is off); at least one
    # character of the script makes sure text without the script never reaches the piece.
    return in_script(piece.replace(WORD_BOUNDARY, ""), ranges)


# ----------------------------------------------------------------------------------------------- corpus
def find_corpus_files(paths: Iterable[str], option: str = "--corpus") -> list[Path]:
    """Resolve files and folders (their ``*.txt``, recursively) and check that each is non-empty UTF-8 text.

    Args:
        paths: files or folders.
        option: the option name used in error messages.

    Raises:
        YakError: listing every missing, empty or non-UTF-8 file.
    """
    files, problems = [], []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.rglob("*.txt"))
            if not found:
                problems.append(f"{p}: folder holds no .txt files")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            problems.append(f"{p}: no such file or folder")
    for f in files:
        problem = _check_utf8_text(f)
        if problem:
            problems.append(f"{f}: {problem}")
    if not paths:
        problems.append("no files given")
    if problems:
        raise YakError(f"{option}: " + "; ".join(problems))
    return files


def _check_utf8_text(path: Path, chunk: int = 1 << 20) -> str | None:
    """What is wrong with ``path`` as UTF-8 text (empty, or not UTF-8 and where), read in chunks; or None."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, newlines, blank = 0, 0, True
    with open(path, "rb") as fh:
        while True:
            data = fh.read(chunk)
            try:
                text = decoder.decode(data, final=not data)
            except UnicodeDecodeError as e:
                at = offset + e.start
                line = newlines + data[: e.start].count(b"\n") + 1
                return f"not UTF-8 (near byte {at}, line {line}: {e.reason}); convert it to UTF-8"
            blank = blank and not text.strip()
            if not data:
                return "file is empty" if blank else None
            offset += len(data)
            newlines += data.count(b"\n")


def holds_script(files: Iterable[Path], ranges: Sequence[tuple[int, int]]) -> bool:
    """True if some line of ``files`` (UTF-8) has a character of ``ranges``; reads up to the first one."""
    pattern = script_pattern(ranges)
    for f in files:
        with open(f, encoding="utf-8") as fh:
            if any(pattern.search(line) for line in fh):
                return True
    return False


def iter_sentences(files: Iterable[Path], max_bytes: int = 8192) -> Iterator[str]:
    """Yield training text: each line, or, for a line over ``max_bytes``, chunks of it.

    A long line is cut after a shad followed by whitespace, and consecutive sentences are packed into
    chunks of at most ``max_bytes`` (so that SentencePiece, which drops longer lines silently, keeps them,
    and pieces may still span a sentence boundary when whitespace splitting is off); a sentence longer than
    ``max_bytes`` is cut at a tsheg or space.

    Args:
        files: UTF-8 text files.
        max_bytes: the longest chunk, in UTF-8 bytes.
    """
    for f in files:
        with open(f, encoding="utf-8") as fh:
            for line in fh:
                line = line.strip()
                if len(line.encode()) <= max_bytes:
                    if line:
                        yield line
                    continue
                chunk = ""
                for sent in _cut_long(_SENTENCE_END.split(line), max_bytes):
                    if chunk and len(chunk.encode()) + 1 + len(sent.encode()) > max_bytes:
                        yield chunk
                        chunk = ""
                    chunk = f"{chunk} {sent}" if chunk else sent
                if chunk:
                    yield chunk


def _cut_long(sentences: Iterable[str], max_bytes: int) -> Iterator[str]:
    for sent in sentences:
        while len(sent.encode()) > max_bytes:
            head = sent.encode()[:max_bytes].decode("utf-8", "ignore")
            cut = max(head.rfind("་"), head.rfind(" "))
            cut = cut + 1 if cut > 0 else len(head)
            yield sent[:cut]
            sent = sent[cut:].lstrip()
        if sent:
            yield sent


# ------------------------------------------------------------------------------------ SentencePiece models
def _model_proto():
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
    proto = _model_proto()
    try:
        proto.ParseFromString(p.read_bytes())
    except DecodeError:
        proto.Clear()
    if not proto.pieces:
        raise YakError(f"{option}: {p} is not a SentencePiece model (it holds no pieces)")
    return proto


def train_sentencepiece(files: Sequence[Path], args: TokenizerArguments, vocab_size: int):
    """Train a SentencePiece model of ``args.model_type`` on the sentences of ``files``.

    Args:
        files: UTF-8 text files.
        args: the trainer options.
        vocab_size: the model's vocabulary size.

    Returns:
        The trained ``ModelProto``.
    """
    import sentencepiece as spm

    buf = io.BytesIO()
    options = dict(
        model_type=args.model_type,
        vocab_size=vocab_size,
        character_coverage=args.character_coverage,
        max_sentencepiece_length=args.max_sentencepiece_length,
        max_sentence_length=args.max_sentence_length,
        input_sentence_size=args.input_sentence_size,
        shuffle_input_sentence=True,
        split_by_whitespace=args.split_by_whitespace,
        # Learn pieces of the raw text, as the merged (identity-normalizing) tokenizer will see it; the
        # default NFKC would learn e.g. U+0F0B where the text has U+0F0C.
        normalization_rule_name="identity",
        seed_sentencepiece_size=1_000_000,
        num_threads=os.cpu_count() or 1,
        bos_id=-1,
        eos_id=-1,
        minloglevel=2,
    )
    spm.set_random_generator_seed(args.seed)
    logger.info("training a %s model with %d pieces on %d files", args.model_type, vocab_size, len(files))
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter_sentences(files, args.max_sentence_length), model_writer=buf, **options
        )
    except RuntimeError as e:
        if "Vocabulary size" in str(e):
            option = (f"--vocab_size {args.vocab_size}" if args.vocab_size
                      else f"--num_pieces {args.num_pieces}")
            raise YakError(f"{option}: the corpus cannot support a {args.model_type} model of {vocab_size} "
                           f"pieces ({e}); ask for fewer or give more text")
        raise
    proto = _model_proto()
    proto.ParseFromString(buf.getvalue())
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


# ------------------------------------------------------------------------------------------------- export
def build_fast_tokenizer(sp_model_file: str | os.PathLike):
    """Build the tokenizers-backed equivalent of a Llama-family SentencePiece BPE model.

    The layout is that of Meta's Llama 2 ``tokenizer.json`` on the Hugging Face Hub: BPE with byte fallback
    and merges ordered by piece score (transformers' ``SentencePieceExtractor``), a normalizer that prepends
    ``▁`` and turns spaces into ``▁`` (SentencePiece's ``add_dummy_prefix``, which adds ``▁`` even before
    leading spaces), Llama's decoder, and ``<s>`` added by the post-processor. transformers 5's own
    ``LlamaTokenizer`` rebuilds a Metaspace pipeline that skips the dummy prefix before a leading space, so
    it would disagree with SentencePiece on such lines.

    Args:
        sp_model_file: the ``tokenizer.model`` file.

    Returns:
        A ``tokenizers.Tokenizer``.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE
    from transformers.tokenization_utils_sentencepiece import SentencePieceExtractor

    vocab, _, merges = SentencePieceExtractor(str(sp_model_file)).extract()
    tok = Tokenizer(BPE(vocab, merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(WORD_BOUNDARY),
                                           normalizers.Replace(" ", WORD_BOUNDARY)])
    tok.decoder = decoders.Sequence([decoders.Replace(WORD_BOUNDARY, " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return tok


LICENCE_FILES = ("NOTICE", "LICENSE", "LICENSE.txt", "USE_POLICY.md")


def export_tokenizer(proto, out_dir: Path, model_max_length: int | None = None,
                     licence_files: Sequence[Path] = ()) -> None:
    """Write ``out_dir/merged_tokenizer_sp/tokenizer.model`` and ``out_dir/merged_tokenizer_hf/``.

    ``merged_tokenizer_hf/`` holds ``tokenizer.model``, ``tokenizer.json`` (see :func:`build_fast_tokenizer`),
    ``tokenizer_config.json`` with the toolkit's Llama 2 chat template, and ``special_tokens_map.json``.

    Args:
        proto: the merged ``ModelProto``.
        out_dir: an existing empty folder.
        model_max_length: the base model's context length, if known.
        licence_files: the base tokenizer's licence files, copied into both folders (redistribution terms).
    """
    from transformers import PreTrainedTokenizerFast

    if proto.normalizer_spec.remove_extra_whitespaces:
        # transformers' Llama tokenizers never collapse spaces; keep the slow model in step with them.
        logger.warning("the base tokenizer collapses runs of spaces; the merged one keeps them, as "
                       "transformers' Llama tokenizers do")
        proto = type(proto).FromString(proto.SerializeToString())
        proto.normalizer_spec.remove_extra_whitespaces = False
    data = proto.SerializeToString()
    (out_dir / SP_DIR).mkdir()
    (out_dir / SP_DIR / "tokenizer.model").write_bytes(data)
    hf = out_dir / HF_DIR
    hf.mkdir()
    (hf / "tokenizer.model").write_bytes(data)
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=build_fast_tokenizer(hf / "tokenizer.model"),
        chat_template=LLAMA2_CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        **({"model_max_length": model_max_length} if model_max_length else {}),
        **special,
    )
    fast.save_pretrained(hf, save_jinja_files=False)
    fast.backend_tokenizer.save(str(hf / "tokenizer.json"), pretty=False)  # a third of the pretty size
    config = json.loads((hf / "tokenizer_config.json").read_text())
    # "add_bos_token" documents what the post-processor does, for readers of the config.
    # PreTrainedTokenizerFast (= TokenizersBackend in transformers 5) loads tokenizer.json as it is, in
    # transformers 4 and 5, vLLM and TGI alike.
    config.update(tokenizer_class="PreTrainedTokenizerFast", add_bos_token=True, add_eos_token=False,
                  pad_token=None)
    (hf / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n")
    (hf / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    for f in licence_files:
        for folder in (hf, out_dir / SP_DIR):
            shutil.copyfile(f, folder / f.name)


def load_tokenizer(path: str | os.PathLike):
    """Load a tokenizer folder with ``AutoTokenizer`` (tokenizers-backed, "fast").

    Args:
        path: a Hugging Face tokenizer folder, or a ``merge_tokenizer.py`` output folder (its
            ``merged_tokenizer_hf/`` is used).
    """
    from transformers import AutoTokenizer

    p = Path(path)
    if (p / HF_DIR).is_dir():
        p = p / HF_DIR
    if not (p / "tokenizer.json").is_file() and not (p / "tokenizer.model").is_file():
        found = sorted(x.name for x in p.iterdir()) if p.is_dir() else "nothing (no such folder)"
        raise YakError(f"tokenizer {path}: no tokenizer.json or tokenizer.model there (found: {found})")
    check_tokenizer_files(p)
    try:
        return AutoTokenizer.from_pretrained(str(p))
    except Exception as e:  # whatever transformers raises on files that passed the checks above
        raise YakError(f"tokenizer {p} cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0][:300]}); "
                       "check its files, or copy them again from where they were made") from e


def save_tokenizer(tokenizer, out_dir: str | os.PathLike) -> None:
    """Save ``tokenizer`` as a complete toolkit tokenizer folder, like ``merged_tokenizer_hf/``.

    transformers 5's ``save_pretrained`` alone moves the chat template to ``chat_template.jinja``, names the
    class ``TokenizersBackend`` (unknown to transformers 4 and older vLLM) and drops ``tokenizer.model``, without
    which llama.cpp's converter rebuilds the vocabulary differently (every Tibetan line then tokenizes
    differently in llama.cpp). So: ``save_pretrained`` with the template in ``tokenizer_config.json``, then
    ``tokenizer.model`` and the ``tokenizer_class`` of the folder the tokenizer was loaded from.

    Args:
        tokenizer: a (fast) tokenizer, possibly changed in memory (e.g. a chat template set).
        out_dir: an existing folder.
    """
    out = Path(out_dir)
    tokenizer.save_pretrained(out, save_jinja_files=False)
    src = Path(tokenizer.name_or_path)
    if (src / "tokenizer.model").is_file() and not (out / "tokenizer.model").is_file():
        shutil.copyfile(src / "tokenizer.model", out / "tokenizer.model")
    if (src / "tokenizer_config.json").is_file():
        cls = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8")).get("tokenizer_class")
        config = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
        if cls and config.get("tokenizer_class") != cls:
            config["tokenizer_class"] = cls
            (out / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n",
                                                       encoding="utf-8")


def load_slow_tokenizer(path: str | os.PathLike):
    """Load the SentencePiece ("slow") processor of a tokenizer folder or ``tokenizer.model`` file.

    Args:
        path: ``tokenizer.model``, a folder holding it, or a ``merge_tokenizer.py`` output folder.
    """
    p = Path(path)
    if (p / SP_DIR).is_dir():
        p = p / SP_DIR
    return sp_processor(load_sp_model(p, option="tokenizer"))


def mismatching_lines(slow, fast, lines: Iterable[str]) -> list[str]:
    """Lines on which the fast tokenizer's ids (no special tokens) differ from SentencePiece's.

    Args:
        slow: a ``sentencepiece.SentencePieceProcessor``.
        fast: a transformers tokenizer.
        lines: texts to compare.
    """
    return [x for x in lines if slow.encode(x) != fast.encode(x, add_special_tokens=False)]


def build_merged_tokenizer(args: TokenizerArguments) -> dict:
    """Train (or read) the new script's model, merge it into the base, check it, and export it.

    Args:
        args: the options (see :class:`TokenizerArguments`).

    Returns:
        A summary: sizes, number of added and dropped pieces, the output paths.
    """
    problems = []
    ranges = []
    try:
        ranges = parse_script_ranges(args.script_ranges)
    except YakError as e:
        problems.append(str(e))
    if args.num_pieces < 1:
        problems.append(f"--num_pieces must be at least 1 (got {args.num_pieces})")
    if not 0 < args.character_coverage <= 1:
        problems.append(f"--character_coverage must be in (0, 1] (got {args.character_coverage})")
    if args.max_sentence_length < 256:
        problems.append(f"--max_sentence_length must be at least 256 bytes (got {args.max_sentence_length})")
    problems += output_dir_problems(args.output_dir, args.overwrite)
    if args.tibetan_sp_model is None and not args.corpus:
        problems.append("--corpus is required to train a model (or give --tibetan_sp_model)")
    # --overwrite replaces output_dir as a whole at the end
    inputs = [args.base_tokenizer, args.tibetan_sp_model, *(args.corpus or [])]
    for path in inputs_inside(args.output_dir, inputs):
        problems.append(f"--output_dir {args.output_dir} is (or contains) the input {path}; "
                        "choose a new folder")
    try:
        files = find_corpus_files(args.corpus) if args.corpus else []
    except YakError as e:
        problems.append(str(e))
        files = []
    if files and ranges and not holds_script(files, ranges):
        # the merge would add only the script's characters: the wrong corpus, or the wrong ranges
        problems.append(f"--corpus {' '.join(args.corpus)}: no character of --script_ranges "
                        f"{args.script_ranges} in any file; give text in the new script, or the ranges of "
                        "the corpus's script")
    base = None
    try:
        base = load_sp_model(args.base_tokenizer)
        if base.trainer_spec.model_type != 2 or not base.trainer_spec.byte_fallback:  # 2: BPE
            problems.append(f"--base_tokenizer {args.base_tokenizer}: not a BPE SentencePiece model with "
                            "byte fallback; the merge needs a Llama-family base")
    except YakError as e:
        problems.append(str(e))
    source = None
    if args.tibetan_sp_model is not None:
        try:
            source = load_sp_model(args.tibetan_sp_model, option="--tibetan_sp_model")
        except YakError as e:
            problems.append(str(e))
    if problems:
        raise YakError("; ".join(problems))

    # the folder is locked (and checked again) while the model trains, not only when it is written
    with replace_dir(args.output_dir, overwrite=args.overwrite) as tmp:
        if source is None:
            size = args.vocab_size or int(args.num_pieces * 1.05) + 100
            source = train_sentencepiece(files, args, vocab_size=size)
        merged, added, dropped = merge_pieces(base, source, args.num_pieces, ranges, args.script_characters)
        if len(added) < args.num_pieces:
            raise YakError(f"--num_pieces {args.num_pieces}: only {len(added)} reachable pieces of the script "
                           f"{args.script_ranges} are available from the new model; ask for at most {len(added)},"
                           " give more text, or check that the text is in the script of --script_ranges")
        base_dir = Path(args.base_tokenizer)
        base_dir = base_dir if base_dir.is_dir() else base_dir.parent
        base_config_path = base_dir / "tokenizer_config.json"
        base_config = json.loads(base_config_path.read_text()) if base_config_path.is_file() else {}
        licences = [base_dir / name for name in LICENCE_FILES if (base_dir / name).is_file()]
        (tmp / SOURCE_DIR).mkdir()
        (tmp / SOURCE_DIR / "tokenizer.model").write_bytes(
            restrict_source(source, added, ranges).SerializeToString())
        export_tokenizer(merged, tmp, base_config.get("model_max_length"), licences)
        # The export must be exact: compare fast with slow on a sample of the corpus (without one, on the
        # added pieces' text run together).
        sample = [s for _, s in zip(range(3000), iter_sentences(files, args.max_sentence_length))] or [
            "".join(added[i:i + 20]).replace(WORD_BOUNDARY, " ") for i in range(0, len(added), 20)]
        bad = mismatching_lines(load_slow_tokenizer(tmp), load_tokenizer(tmp), sample)
        if bad:
            raise RuntimeError(f"fast and slow tokenizers disagree on {len(bad)} of {len(sample)} sentences, "
                               f"e.g. {bad[0]!r}")
    summary = {
        "base_pieces": len(base.pieces),
        "added_pieces": len(added),
        "dropped_unreachable": dropped,
        "vocab_size": len(merged.pieces),
        "model_type": args.model_type if args.tibetan_sp_model is None else "given",
        "output_dir": str(args.output_dir),
    }
    logger.info("merged tokenizer: %s", summary)
    return summary
