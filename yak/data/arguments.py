"""The continued-pretraining data options."""

from __future__ import annotations

from dataclasses import dataclass, field

from yak.data.sources import DEFAULT_MIX


@dataclass
class DataArguments:
    """Where the continued-pretraining text is, how to cut it into blocks, and how to mix its sources."""

    dataset_dir: str = field(
        default="data/pt",
        metadata={
            "help": "Folder of the pretraining text. Each sub-folder is a source (e.g. bo/, en/, zh/) holding "
            "*.txt files (one sample a line) and *.jsonl files (one {\"text\": ...} a line); files directly "
            "in the folder form the source '.'."
        },
    )
    data_cache_dir: str = field(
        default="data_cache",
        metadata={
            "help": "Folder for the tokenized blocks. Entries are keyed by the files' content, the tokenizer's "
            "full serialization and block_size, so a changed file or tokenizer is never served stale ids. "
            "Old entries may be deleted at any time."
        },
    )
    validation_split_percentage: float = field(
        default=0.05,
        metadata={
            "help": "Percentage (0-100, not a fraction) of each source's blocks held out for validation; at "
            "least one block per source when above 0. The original passed this value to "
            "train_test_split as a fraction: its 0.005 is 0.5 here."
        },
    )
    block_size: int = field(
        default=512,
        metadata={"help": "Tokens per training sequence; must not exceed the model's context length."},
    )
    preprocessing_num_workers: int | None = field(
        default=None,
        metadata={"help": "Processes for tokenization (default: the number of CPU cores, at most 16)."},
    )
    mix: str = field(
        default=DEFAULT_MIX,
        metadata={
            "help": "Share of training tokens per group of sources, as name=weight pairs over sub-folder "
            "names; '+' joins sources into a group that keeps their natural proportions. The first group "
            "is used once; the others are down- or up-sampled to their share. 'none': natural proportions. "
            f"The default '{DEFAULT_MIX}' (Tibetan : English+Chinese = 3 : 4, as the paper) drops absent "
            "folders and falls back to natural proportions when it does not fit the folders."
        },
    )
    on_decode_error: str = field(
        default="skip",
        metadata={
            "help": "Lines that are not valid UTF-8: 'skip' leaves them out and reports how many and where; "
            "'stop' refuses the data and lists them (file:line).",
            "choices": ["skip", "stop"],
        },
    )
