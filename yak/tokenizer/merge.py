"""Tokenizer stage: train a SentencePiece model on a script's text, merge it into a Llama-family BPE model
(:mod:`yak.tokenizer.pieces`, which says why the merge is done as it is), and export matching slow and fast
files (:mod:`yak.tokenizer.export`).
"""

from __future__ import annotations

import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from yak import YakError
from yak.outdir import inputs_inside, output_dir_problems, replace_dir
from yak.tokenizer.corpus import (
    TIBETAN_RANGES,
    find_corpus_files,
    holds_script,
    iter_sentences,
    parse_script_ranges,
)
from yak.tokenizer.export import (
    HF_DIR,
    LICENCE_FILES,
    SOURCE_DIR,
    SP_DIR,
    export_tokenizer,
    load_slow_tokenizer,
    load_tokenizer,
    mismatching_lines,
)
from yak.tokenizer.pieces import WORD_BOUNDARY, load_sp_model, merge_pieces, model_proto, restrict_source

logger = logging.getLogger(__name__)


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


# ------------------------------------------------------------------------------------------------ training
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
    proto = model_proto()
    proto.ParseFromString(buf.getvalue())
    return proto


# --------------------------------------------------------------------------------------------- entry point
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
