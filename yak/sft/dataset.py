"""The SFT datasets: ``SFTDataArguments``, and the build from records to cached, split, tokenized (and
optionally packed) datasets."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from yak import YakError
from yak.formats import tokenizer_fingerprint
from yak.io import content_hash
from yak.outdir import cache_entry
from yak.sft.records import find_data_files, read_conversations
from yak.sft.tokens import IGNORE_INDEX, pack_batch, tokenize_batch
from yak.template import LLAMA2_CHAT_TEMPLATE

logger = logging.getLogger(__package__)  # "yak.sft", the name its log lines have always shown

# Bump when the tokenized layout changes, so old caches are not reused.
CACHE_VERSION = 1


@dataclass
class SFTDataArguments:
    """Where the instruction data is and how it becomes training sequences."""

    dataset_dir: str = field(
        default="data/sft",
        metadata={
            "help": "Instruction data: a folder (every *.json and *.jsonl file directly in it, in name "
            "order) or one such file. Records are Alpaca ({instruction, input, output}) or chat ({messages: "
            "[{role, content}, ...]}); see docs/sft.md."
        },
    )
    data_cache_dir: str | None = field(
        default="data_cache",
        metadata={
            "help": "Folder for the tokenized datasets, keyed by the data files' content, the tokenizer and "
            "these options (a changed file or tokenizer is never served stale ids); old entries may be deleted "
            "at any time. Empty: no cache on disk."
        },
    )
    validation_split_percentage: float = field(
        default=1.0,
        metadata={
            "help": "Percent (0-100) of the conversations held out for validation, at least one when above "
            "0. 0: an empty validation split."
        },
    )
    max_seq_length: int = field(
        default=1024,
        metadata={
            "help": "Longest training sequence in tokens. Longer conversations are cut at the end (inputs "
            "and labels together); the number cut is logged, and those left with no answer token are dropped."
        },
    )
    packing: bool = field(
        default=False,
        metadata={
            "help": "Pack several conversations into each sequence of up to max_seq_length tokens, with "
            "position ids restarting at 0 for each, so that they do not attend to each other (sdpa, eager, "
            "flex and flash_attention_2 attention in transformers; see docs/sft.md)."
        },
    )
    system_prompt: str | None = field(
        default=None,
        metadata={
            "help": "System prompt for conversations that bring none. Unset: the chat template's default "
            "(yak.template.DEFAULT_SYSTEM_PROMPT). An empty string: no system block."
        },
    )
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Processes for tokenization and packing (datasets.map num_proc)."}
    )

    def __post_init__(self):
        problems = []
        if not 0 <= self.validation_split_percentage < 100:
            problems.append(
                f"validation_split_percentage must be in [0, 100), got {self.validation_split_percentage}"
            )
        if self.max_seq_length < 16:
            problems.append(f"max_seq_length must be at least 16, got {self.max_seq_length}")
        if self.preprocessing_num_workers is not None and self.preprocessing_num_workers < 1:
            problems.append(
                f"preprocessing_num_workers must be at least 1, got {self.preprocessing_num_workers}"
            )
        if problems:
            raise YakError("SFT data options: " + "; ".join(problems))


def _ensure_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise YakError(
            f"SFT needs a fast (tokenizers-backed) tokenizer, got {type(tokenizer).__name__}; load it "
            "with yak.tokenizer.load_tokenizer or AutoTokenizer.from_pretrained"
        )
    if tokenizer.chat_template is None:
        logger.info(
            "the tokenizer has no chat_template; setting yak.template.LLAMA2_CHAT_TEMPLATE (it is saved "
            "with the tokenizer)"
        )
        tokenizer.chat_template = LLAMA2_CHAT_TEMPLATE
    elif tokenizer.chat_template != LLAMA2_CHAT_TEMPLATE:
        logger.warning(
            "the tokenizer's chat_template is not yak.template.LLAMA2_CHAT_TEMPLATE; training with the "
            "tokenizer's own template"
        )


def _split(ds, percentage: float, seed: int):
    import datasets

    n_val = 0 if percentage == 0 else max(1, round(len(ds) * percentage / 100))
    if n_val >= len(ds):
        raise YakError(
            f"validation_split_percentage {percentage} leaves no training data out of {len(ds)} "
            "conversations; lower it or add data"
        )
    if n_val == 0:
        return datasets.DatasetDict({"train": ds.shuffle(seed=seed), "validation": ds.select([])})
    split = ds.train_test_split(test_size=n_val, seed=seed)
    return datasets.DatasetDict({"train": split["train"], "validation": split["test"]})


def build_sft_datasets(tokenizer, args: SFTDataArguments, seed: int = 42):
    """Build the tokenized SFT datasets.

    Steps: find and check the records (all problems in one error), set the chat template if the tokenizer has
    none, split off validation conversations, render + tokenize + mask labels, truncate to ``max_seq_length``
    (dropping conversations whose answers are cut away entirely), optionally pack, and cache on disk.

    Args:
        tokenizer: the training tokenizer (fast); its ``chat_template`` is set to ``LLAMA2_CHAT_TEMPLATE`` if
            it has none, so that saving it after training keeps the template the model was trained with.
        args: the data options.
        seed: shuffling seed of the validation split.

    Returns:
        ``datasets.DatasetDict`` with ``train`` and ``validation``; columns ``input_ids``, ``labels`` and,
        when packing, ``position_ids``.
    """
    import datasets

    files = find_data_files(args.dataset_dir)
    _ensure_chat_template(tokenizer)
    options = {
        k: getattr(args, k)
        for k in ("validation_split_percentage", "max_seq_length", "packing", "system_prompt")
    }
    cache_dir = None
    if args.data_cache_dir:
        key = content_hash(
            files,
            {
                "tokenizer": tokenizer_fingerprint(tokenizer),
                "seed": seed,
                "version": CACHE_VERSION,
                **options,
            },
        )
        cache_dir = Path(args.data_cache_dir) / f"sft-{key[:20]}"
        if cache_dir.is_dir():
            logger.info("loading tokenized SFT data from cache %s", cache_dir)
            return datasets.load_from_disk(str(cache_dir))

    special = tuple(sorted(set(tokenizer.all_special_tokens)))
    conversations = read_conversations(files, special)
    if args.system_prompt is not None:
        conversations = [
            m if m[0]["role"] == "system" else [{"role": "system", "content": args.system_prompt}, *m]
            for m in conversations
        ]
    logger.info(
        "read %d conversations from %d file(s) in %s", len(conversations), len(files), args.dataset_dir
    )
    tokenized = datasets.Dataset.from_dict({"messages": conversations}).map(
        tokenize_batch,
        batched=True,
        remove_columns=["messages"],
        num_proc=args.preprocessing_num_workers,
        fn_kwargs={"tokenizer": tokenizer, "max_seq_length": args.max_seq_length},
        desc="tokenizing",
    )
    tokenized = _split(tokenized, args.validation_split_percentage, seed)
    rows, result = [], {}
    for name, ds in tokenized.items():
        n_long = sum(n > args.max_seq_length for n in ds["num_tokens"])
        kept = ds.filter(
            lambda labels: any(x != IGNORE_INDEX for x in labels),
            input_columns="labels",
            num_proc=args.preprocessing_num_workers,
            desc="dropping answerless",
        )
        kept = kept.remove_columns("num_tokens")
        row = {
            "split": name,
            "conversations": len(ds),
            "truncated": n_long,
            "dropped": len(ds) - len(kept),
            "tokens": sum(map(len, kept["input_ids"])),
            "answer_tokens": sum(sum(x != IGNORE_INDEX for x in lab) for lab in kept["labels"]),
        }
        if args.packing:
            kept = kept.map(
                pack_batch,
                batched=True,
                num_proc=args.preprocessing_num_workers,
                fn_kwargs={"max_seq_length": args.max_seq_length},
                desc="packing",
            )
            row["sequences"] = len(kept)
            row["fill"] = f"{row['tokens'] / max(1, len(kept) * args.max_seq_length):.0%}"
        if n_long:
            logger.warning(
                "%s: %d of %d conversations were longer than max_seq_length=%d and were truncated; %d "
                "lost every answer token and were dropped",
                name,
                n_long,
                len(ds),
                args.max_seq_length,
                row["dropped"],
            )
        rows.append(row)
        result[name] = kept
    result = datasets.DatasetDict(result)
    if len(result["train"]) == 0:
        raise YakError(
            f"no training conversation keeps an answer token within max_seq_length="
            f"{args.max_seq_length}; raise it"
        )
    _log_table(rows)
    if cache_dir is not None:
        with cache_entry(cache_dir) as tmp:
            result.save_to_disk(str(tmp))
        logger.info("cached tokenized SFT data in %s", cache_dir)
    return result


def _log_table(rows: list[dict]) -> None:
    cols = list(rows[0])
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(str(r.get(c, "")).rjust(w) for c, w in zip(cols, widths)) for r in rows]
    logger.info("SFT data:\n%s", "\n".join(lines))
