"""Tokenizer stage: read a new script's corpus (:mod:`yak.tokenizer.corpus`), train its SentencePiece model and
merge it into a Llama-family tokenizer (:mod:`yak.tokenizer.merge` over :mod:`yak.tokenizer.pieces`), export
slow and fast files that agree exactly (:mod:`yak.tokenizer.export`), and measure tokenizers
(:mod:`yak.tokenizer.report`).
"""

from yak.tokenizer.corpus import has_script, parse_script_ranges
from yak.tokenizer.export import (
    HF_DIR,
    SOURCE_DIR,
    SP_DIR,
    load_slow_tokenizer,
    load_tokenizer,
    mismatching_lines,
    save_tokenizer,
)
from yak.tokenizer.merge import TokenizerArguments, build_merged_tokenizer
from yak.tokenizer.pieces import load_sp_model, unreachable_pieces
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
