"""Build the continued-pretraining datasets: check the options and the files, fill the block cache, then
split and mix."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from yak import YakError
from yak.data.arguments import DataArguments
from yak.data.blocks import CACHE_VERSION, build_source, plain_backend_json
from yak.data.read import CHUNK_BYTES, listed, scan_file
from yak.data.sources import find_sources, resolve_mix, share_tables, split_and_mix
from yak.formats import tokenizer_fingerprint
from yak.io import content_hash

logger = logging.getLogger(__package__)  # "yak.data", the name its log lines have always shown


def option_problems(data_args: DataArguments, layout: bool = True) -> list[str]:
    """The problems with the data options and (``layout``) the data folder's sources and ``--mix`` that can be
    found without a tokenizer or reading the text: train.py checks them before it changes the output folder."""
    problems = []
    if data_args.block_size < 1:
        problems.append(f"--block_size {data_args.block_size}: must be a positive number of tokens")
    if not 0 <= data_args.validation_split_percentage < 100:
        problems.append(
            f"--validation_split_percentage {data_args.validation_split_percentage}: must be a percentage "
            "from 0 up to (not including) 100"
        )
    if data_args.on_decode_error not in ("skip", "stop"):
        problems.append(f"--on_decode_error {data_args.on_decode_error!r}: use 'skip' or 'stop'")
    if data_args.preprocessing_num_workers is not None and data_args.preprocessing_num_workers < 1:
        problems.append(f"--preprocessing_num_workers {data_args.preprocessing_num_workers}: must be 1 or more")
    if layout:
        try:
            resolve_mix(data_args.mix, [s.name for s in find_sources(data_args.dataset_dir)])
        except YakError as e:
            problems.append(str(e))
    return problems


def _check_args(data_args: DataArguments, tokenizer) -> list[str]:
    problems = option_problems(data_args, layout=False)  # the caller reads the layout next
    if not getattr(tokenizer, "is_fast", False):
        problems.append(
            f"{type(tokenizer).__name__} is not a fast tokenizer; load it with yak.tokenizer.load_tokenizer "
            "or AutoTokenizer.from_pretrained(folder) (which converts a tokenizer.model)"
        )
    if getattr(tokenizer, "eos_token_id", None) is None:
        problems.append("the tokenizer has no EOS token, which separates the samples; set its eos_token")
    return problems


def build_pretraining_datasets(tokenizer, data_args: DataArguments, seed: int = 42):
    """Tokenized, grouped, mixed continued-pretraining data, built once and then loaded from the cache.

    Every row of both splits is ``block_size`` ids (stored as int32; rows read as Python lists). Labels are
    the collator's job. The achieved shares per source and group are logged as a table.

    Distributed runs: let the main process build the cache first and the others load it:
    ``with training_args.main_process_first(local=False): build_pretraining_datasets(...)`` (``local=True``
    when every node has its own ``data_cache_dir``).

    Args:
        tokenizer: a fast (tokenizers-backed) Hugging Face tokenizer with an EOS token.
        data_args: the data options.
        seed: seeds the validation split, the sampling for the mix and the order of the training blocks.

    Returns:
        ``datasets.DatasetDict`` with ``train`` and ``validation``, column ``input_ids``.

    Raises:
        YakError: with every problem found in the options or the files.
    """
    import datasets

    problems = _check_args(data_args, tokenizer)
    if problems:
        raise YakError("invalid data options:" + listed(problems))
    sources = find_sources(data_args.dataset_dir)
    groups = resolve_mix(data_args.mix, [s.name for s in sources])
    cache = Path(data_args.data_cache_dir)
    root = Path(data_args.dataset_dir)
    extra = {"tokenizer": tokenizer_fingerprint(tokenizer), "block_size": data_args.block_size,
             "chunk_bytes": CHUNK_BYTES, "version": CACHE_VERSION}
    logger.info("hashing %d files (%.1f MB) for the cache keys",
                sum(len(s.files) for s in sources), sum(f.stat().st_size for s in sources for f in s.files) / 1e6)
    entries = {
        s.name: cache / "{}-{}".format(
            re.sub(r"[^\w-]", "_", s.name),
            content_hash(s.files, {**extra, "files": [str(f.relative_to(root)) for f in s.files]})[:24],
        )
        for s in sources
    }
    todo = [s for s in sources if not (entries[s.name] / "meta.json").is_file()]

    # Check every file to build before tokenizing anything, and report all problems at once.
    scans = {}
    for s in todo:
        with tqdm(total=sum(f.stat().st_size for f in s.files), unit="B", unit_scale=True,
                  desc=f"checking source {s.name}") as progress:
            scans[s.name] = [scan_file(f, progress) for f in s.files]
    problems = []
    for name, file_scans in scans.items():
        for scan in file_scans:
            problems += [f"{scan.path}: {b}" for b in scan.bad_json_at]
            if scan.bad_json > len(scan.bad_json_at):
                problems.append(f"{scan.path}: {scan.bad_json - len(scan.bad_json_at)} more lines like these")
            if data_args.on_decode_error == "stop" and scan.undecodable:
                problems += [f"{scan.path}:{n}: not valid UTF-8" for n in scan.undecodable_at]
                if scan.undecodable > len(scan.undecodable_at):
                    problems.append(f"{scan.path}: {scan.undecodable - len(scan.undecodable_at)} more lines "
                                    "that are not UTF-8")
        if not sum(scan.samples for scan in file_scans):
            problems.append(f"source {name}: its files hold no text (only blank or unusable lines)")
    if data_args.on_decode_error == "stop":  # an entry cached by a run that skipped them does not hide them
        for s in sources:
            files = [] if s in todo else json.loads((entries[s.name] / "meta.json").read_text("utf-8"))["files"]
            for f in files:
                problems += [f"{f['path']}:{n}: not valid UTF-8" for n in f["undecodable_at"]]
                if f["undecodable_lines"] > len(f["undecodable_at"]):
                    problems.append(f"{f['path']}: {f['undecodable_lines'] - len(f['undecodable_at'])} more "
                                    "lines that are not UTF-8")
    if problems:
        undecodable = any("UTF-8" in p for p in problems)  # only --on_decode_error stop lists them
        raise YakError(
            "the pretraining text has problems:" + listed(problems) + "\nFix these lines (every *.jsonl line "
            "must be a JSON object with a \"text\" string; text must be UTF-8)"
            + (", or pass --on_decode_error skip to leave out undecodable lines" if undecodable else "")
        )
    short = []
    backend_json = plain_backend_json(tokenizer) if todo else ""
    for source in todo:
        logger.info("building cache entry %s for source %s", entries[source.name], source.name)
        if not build_source(source, scans[source.name], backend_json, tokenizer.eos_token_id, data_args,
                             entries[source.name]):
            samples = sum(scan.samples for scan in scans[source.name])
            short.append(f"source {source.name}: {samples} samples give fewer than {data_args.block_size} tokens")
    if short:
        raise YakError(
            f"--block_size {data_args.block_size} is larger than the data:" + listed(short)
            + "\nAdd text to these sources or lower --block_size"
        )

    metas, blocks = {}, {}
    for source in sources:
        entry = entries[source.name]
        metas[source.name] = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
        blocks[source.name] = datasets.load_from_disk(str(entry / "blocks"))
        if source not in todo:
            logger.info("source %s: loaded %d blocks from cache %s", source.name, len(blocks[source.name]), entry)
        for f in metas[source.name]["files"]:
            if f["undecodable_lines"]:
                logger.warning("%s: skipped %d lines that are not UTF-8 (lines %s%s)", f["path"],
                               f["undecodable_lines"], ", ".join(map(str, f["undecodable_at"])),
                               ", ..." if f["undecodable_lines"] > len(f["undecodable_at"]) else "")
    counts = {name: len(b) for name, b in blocks.items()}
    train_idx, val_idx, stats = split_and_mix(
        counts, groups, data_args.validation_split_percentage, np.random.default_rng(seed)
    )
    logger.info("pretraining data, %d-token blocks (shares in tokens):\n%s", data_args.block_size,
                share_tables(groups, stats, metas, data_args.block_size))
    for (names, _), n in zip(groups, [sum(stats[s][1] for s in g) for g, _ in groups]):
        factor = sum(stats[s][2] for s in names) / n
        if factor > 4:
            logger.warning("group %s is repeated x%.1f to reach its share; add text to it or lower its weight",
                           "+".join(names), factor)
    everything = datasets.concatenate_datasets(list(blocks.values()))
    return datasets.DatasetDict(
        {"train": everything.select(train_idx), "validation": everything.select(val_idx)}
    )
