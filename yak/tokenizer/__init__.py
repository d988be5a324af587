"""Tokenizer stage: train a new script's SentencePiece model, merge it into a Llama-family tokenizer with
exact slow/fast agreement (:mod:`yak.tokenizer.merge`), and measure tokenizers (:mod:`yak.tokenizer.report`).
"""

from yak.tokenizer.merge import (
    HF_DIR,
    SOURCE_DIR,
    SP_DIR,
    TokenizerArguments,
    build_merged_tokenizer,
    has_script,
    load_slow_tokenizer,
    load_sp_model,
    load_tokenizer,
    mismatching_lines,
    parse_script_ranges,
    save_tokenizer,
    unreachable_pieces,
)
from yak.tokenizer.report import ReportArguments, run_report, tokenizer_stats

__all__ = [
    "HF_DIR",
    "SOURCE_DIR",
    "SP_DIR",
    "ReportArguments",
    "TokenizerArguments",
    "build_merged_tokenizer",
    "has_script",
    "load_slow_tokenizer",
    "load_sp_model",
    "load_tokenizer",
    "mismatching_lines",
    "parse_script_ranges",
    "run_report",
    "save_tokenizer",
    "tokenizer_stats",
    "unreachable_pieces",
]
