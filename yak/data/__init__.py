"""Continued-pretraining data: read sources, tokenize, group into blocks, cache, split, mix.

Layout: every sub-folder of ``dataset_dir`` is a *source* (``bo/``, ``en/``, ``zh/``); files directly in
``dataset_dir`` form the source ``.``. A source holds ``*.txt`` files (one sample a line) and ``*.jsonl``
files (one ``{"text": ...}`` object a line), in any sub-folders. Blank lines are skipped.

Pipeline, per source: check every line (undecodable bytes, JSON without ``"text"``) -> tokenize with the
fast tokenizer, one ``datasets.map`` call over ~1 MB line-aligned chunks in ``preprocessing_num_workers``
processes -> BOS (as the tokenizer adds it) + ids + EOS per sample -> concatenate and cut into
``block_size`` blocks -> save to ``data_cache_dir`` under a key made of the files' bytes, the tokenizer's
full serialization and the block size. The validation split and the mix are then drawn from the cached
blocks with ``seed``: changing them never re-tokenizes, and changing a file re-tokenizes only its source.

Mixing (the paper's Tibetan : English+Chinese = 3 : 4): the ``mix`` spec gives each group of sources a
weight; shares are in tokens (every block has ``block_size`` tokens, so in blocks). The first group is the
anchor: its training blocks are used once; every other group is down-sampled (without repetition) or
repeated (whole copies, then a random part) to reach its share. Sources inside a group keep their natural
proportions.

A module per concern, each importing only from those above it:

- :mod:`yak.data.sources`: the sources, ``--mix`` (``parse_mix``, ``resolve_mix``), the split and the mix.
- :mod:`yak.data.arguments`: ``DataArguments``.
- :mod:`yak.data.read`: the files read in line-aligned chunks, with their problems.
- :mod:`yak.data.blocks`: the block cache (tokenize, cut into blocks, save an entry).
- :mod:`yak.data.build`: ``option_problems`` and ``build_pretraining_datasets``.
"""

from yak.data.arguments import DataArguments
from yak.data.build import build_pretraining_datasets, option_problems
from yak.data.sources import Source, find_sources, parse_mix, resolve_mix

__all__ = ["DataArguments", "Source", "build_pretraining_datasets", "find_sources", "option_problems", "parse_mix",
           "resolve_mix"]
