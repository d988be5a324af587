"""Instruction-tuning (SFT) data: read Alpaca and chat records, check them, render them with the chat
template, mask the labels to the assistant answers, truncate, optionally pack, cache, and collate.

Two record forms are accepted, in ``.json`` (an array of records, or JSON Lines) and ``.jsonl`` files:

* Alpaca: ``{"instruction": str, "input": str (optional), "output": str, "system": str (optional)}``;
  the user turn is ``instruction`` followed by ``"\\n"`` and ``input`` when ``input`` is not empty.
* chat: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``: an optional system
  message first, then user and assistant turns alternating, ending with an assistant answer.

The text a model is trained on is exactly ``tokenizer.apply_chat_template(messages)``: the tokenizer's own
``chat_template`` (``yak.template.LLAMA2_CHAT_TEMPLATE`` in every tokenizer this toolkit writes) renders the
conversation, and the tokenizer encodes the rendered text once. Labels are -100 everywhere except on the
tokens of every assistant answer, including the end-of-sequence token the template writes after each answer.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from yak import YakError
from yak.formats import tokenizer_fingerprint
from yak.io import content_hash
from yak.outdir import cache_entry
from yak.template import LLAMA2_CHAT_TEMPLATE

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label value that torch's cross-entropy (and transformers' loss) skips
ROLES = ("system", "user", "assistant")
DATA_SUFFIXES = (".json", ".jsonl")
MAX_PROBLEMS_SHOWN = 100
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


# ---------------------------------------------------------------------------------------------------------
# Reading and checking records
# ---------------------------------------------------------------------------------------------------------


def find_data_files(dataset_dir: str | os.PathLike) -> list[Path]:
    """Return the ``.json``/``.jsonl`` files of ``dataset_dir`` (a folder or one file), sorted by name."""
    path = Path(dataset_dir)
    if path.is_file():
        if path.suffix not in DATA_SUFFIXES:
            raise YakError(
                f"dataset_dir {path} is a {path.suffix or 'suffix-less'} file; give a .json or .jsonl file"
            )
        return [path]
    if not path.is_dir():
        raise YakError(
            f"dataset_dir {path} does not exist; give a folder of .json/.jsonl files or one such file"
        )
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in DATA_SUFFIXES)
    if not files:
        found = sorted(p.name for p in path.iterdir())[:10]
        raise YakError(f"dataset_dir {path} has no .json or .jsonl files (found: {found or 'nothing'})")
    return files


_WS = re.compile(r"\s*")


def _iter_json(path: Path) -> Iterator[tuple[int, object]]:
    """Yield ``(line, value)`` for each record of a JSON array file or a JSON Lines file.

    A hand-written scan (``json.JSONDecoder.raw_decode`` element by element) because ``json.load`` and
    ``datasets``' JSON loader do not say on which line each record starts, and problems must name the line.
    Raises ``ValueError(line, message)`` on malformed JSON.
    """
    text = path.read_text(encoding="utf-8-sig")  # -sig: tolerate a byte-order mark
    decoder = json.JSONDecoder()
    pos = _WS.match(text).end()
    if not text.startswith("[", pos):  # JSON Lines, whatever the suffix
        # split at "\n" only: splitlines() also splits at U+2028, U+0085..., which JSON strings may hold raw
        for line_no, line in enumerate(text.split("\n"), 1):
            if line.strip():
                try:
                    yield line_no, json.loads(line)
                except json.JSONDecodeError as e:
                    whole = None
                    with contextlib.suppress(json.JSONDecodeError):
                        whole = json.loads(text)
                    # e.g. a pretty-printed record, or {"data": [...]}; ValueError(line, why) is the contract
                    if isinstance(whole, dict):
                        raise ValueError(  # noqa: TRY004
                            1, f"the file is one JSON object (keys: {', '.join(list(whole)[:5])}) over several "
                            "lines; give a JSON array of records ([{...}, {...}]) or one record a line (JSON Lines)"
                        ) from None
                    raise ValueError(line_no, f"invalid JSON ({e.msg} at column {e.colno})") from None
        return
    line_no, counted = 1, 0

    def line_at(p: int) -> int:
        nonlocal line_no, counted
        line_no += text.count("\n", counted, p)
        counted = p
        return line_no

    pos = _WS.match(text, pos + 1).end()
    if text.startswith("]", pos):
        return
    while True:
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise ValueError(e.lineno, f"invalid JSON ({e.msg} at column {e.colno})") from None
        yield line_at(pos), value
        pos = _WS.match(text, end).end()
        if text.startswith(",", pos):
            pos = _WS.match(text, pos + 1).end()
        elif text.startswith("]", pos) and not text[pos + 1 :].strip():
            return
        else:
            raise ValueError(line_at(pos), "expected ',' or the closing ']' of the array of records")


def _type_name(value) -> str:
    return "null" if value is None else type(value).__name__


def _check_text(record: dict, key: str, required: bool, non_empty: bool) -> list[str]:
    if key not in record or record[key] is None:
        return [f"missing '{key}'"] if required else []
    value = record[key]
    if not isinstance(value, str):
        return [f"'{key}' must be a string, found {_type_name(value)}"]
    if non_empty and not value.strip():
        return [f"empty '{key}'"]
    return []


def record_to_messages(record, special_tokens: tuple[str, ...] = ()) -> tuple[list[dict] | None, list[str]]:
    """Check one record and turn it into a chat conversation.

    Args:
        record: a decoded JSON value, Alpaca or chat form.
        special_tokens: token strings (``</s>``...) that must not appear inside the text, where they would be
            encoded as control tokens.

    Returns:
        ``(messages, [])`` for a good record, ``(None, problems)`` otherwise.
    """
    if not isinstance(record, dict):
        return None, [f"record is a {_type_name(record)}, expected an object"]
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            return None, [
                f"'messages' must be a non-empty list, found {_type_name(messages)} {messages!r:.40}"
            ]
        problems = []
        turn = 0  # index among the non-system messages: even = user, odd = assistant
        for i, msg in enumerate(messages):
            where = f"messages[{i}]"
            if not isinstance(msg, dict):
                problems.append(
                    f"{where} is a {_type_name(msg)}, expected an object with 'role' and 'content'"
                )
                continue
            role = msg.get("role")
            if role not in ROLES:
                found = "no 'role'" if "role" not in msg else f"role {role!r}"
                problems.append(f"{where} has {found}; expected one of {', '.join(ROLES)}")
                continue
            is_answer = role == "assistant"
            problems += [
                f"{where}: {p}" for p in _check_text(msg, "content", True, non_empty=role != "system")
            ]
            if role == "system":
                if i != 0:
                    problems.append(f"{where}: a system message may only come first")
                continue
            expected = "user" if turn % 2 == 0 else "assistant"
            if role != expected:
                problems.append(
                    f"{where}: expected role '{expected}', found '{role}' (turns must alternate "
                    "user/assistant after an optional system message)"
                )
            turn += 1
            if i == len(messages) - 1 and not is_answer:
                problems.append(
                    f"{where}: the conversation ends with a {role} message; it must end with an "
                    "assistant answer"
                )
        texts = [m.get("content") for m in messages if isinstance(m, dict)]
    elif "instruction" in record or "output" in record:
        problems = (
            _check_text(record, "instruction", True, True)
            + _check_text(record, "input", False, False)
            + _check_text(record, "output", True, True)
            + _check_text(record, "system", False, False)
        )
        texts = [record.get(k) for k in ("instruction", "input", "output", "system")]
        if not problems:
            user = record["instruction"].strip()
            if (record.get("input") or "").strip():
                user += "\n" + record["input"].strip()
            messages = [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
            if record.get("system") is not None:
                messages.insert(0, {"role": "system", "content": record["system"]})
    else:
        keys = ", ".join(sorted(record)) or "none"
        return None, [
            f"neither 'messages' (chat form) nor 'instruction'/'output' (Alpaca form); keys: {keys}"
        ]
    for token in special_tokens:
        if any(isinstance(t, str) and token in t for t in texts):
            problems.append(
                f"the text contains the special token {token!r}, which would be encoded as a control "
                "token; remove it"
            )
    if problems:
        return None, problems
    return [{"role": m["role"], "content": m["content"]} for m in messages], []


def read_conversations(files: list[Path], special_tokens: tuple[str, ...] = ()) -> list[list[dict]]:
    """Read and check every record of ``files``; one :class:`YakError` lists all bad records (file:line).

    Args:
        files: ``.json`` / ``.jsonl`` files.
        special_tokens: see :func:`record_to_messages`.
    """
    conversations, problems = [], []
    for path in files:
        try:
            for line, record in _iter_json(path):
                messages, record_problems = record_to_messages(record, special_tokens)
                problems += [f"{path}:{line}: {p}" for p in record_problems]
                if messages is not None:
                    conversations.append(messages)
        except UnicodeDecodeError as e:  # (a ValueError too: caught first)
            problems.append(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})")
        except ValueError as e:  # malformed JSON: the rest of this file cannot be read
            problems.append(f"{path}:{e.args[0]}: {e.args[1]}")
    if problems:
        shown = "\n  ".join(problems[:MAX_PROBLEMS_SHOWN])
        more = (
            f"\n  ... and {len(problems) - MAX_PROBLEMS_SHOWN} more"
            if len(problems) > MAX_PROBLEMS_SHOWN
            else ""
        )
        raise YakError(
            f"{len(problems)} problem(s) in the instruction data (see docs/sft.md for the formats):\n  "
            f"{shown}{more}"
        )
    if not conversations:
        raise YakError(f"no records in {', '.join(map(str, files))}")
    return conversations


# ---------------------------------------------------------------------------------------------------------
# Rendering, label masks, truncation, packing
# ---------------------------------------------------------------------------------------------------------


def render_conversation(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Render ``messages`` with the tokenizer's chat template; return the text and the answers' spans.

    Each span runs from the end of the prompt that asks for an answer (the conversation up to that answer,
    rendered with ``add_generation_prompt=True``) to the end of the conversation rendered through that answer,
    so it holds the answer and what the template writes after it (the EOS).
    """
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (text.startswith(prompt) and text.startswith(through) and len(prompt) <= len(through)):
            raise YakError(
                "the tokenizer's chat_template renders a conversation differently from its beginning, so "
                "the answers cannot be located; use yak.template.LLAMA2_CHAT_TEMPLATE"
            )
        spans.append((len(prompt), len(through)))
    return text, spans


def _answer_labels(
    input_ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]
) -> list[int]:
    """Labels = ``input_ids`` on tokens that overlap an answer span, ``IGNORE_INDEX`` elsewhere."""
    labels = [IGNORE_INDEX] * len(input_ids)
    s = 0
    for t, (start, end) in enumerate(offsets):
        while s < len(spans) and start >= spans[s][1]:
            s += 1
        if s == len(spans):
            break
        if end > spans[s][0]:
            labels[t] = input_ids[t]
    return labels


def tokenize_conversations(
    tokenizer, conversations: list[list[dict]]
) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids (equal to ``tokenizer.apply_chat_template(messages)``) and labels of each conversation.

    Args:
        tokenizer: a fast tokenizer with a ``chat_template`` (offsets locate the answers).
        conversations: lists of ``{"role", "content"}`` messages.
    """
    rendered = [render_conversation(tokenizer, messages) for messages in conversations]
    # apply_chat_template(tokenize=True) encodes the rendered text exactly like this.
    enc = tokenizer(
        [text for text, _ in rendered], add_special_tokens=False, return_offsets_mapping=True, verbose=False
    )  # verbose=False: no "longer than model_max_length" warning; we truncate
    labels = [
        _answer_labels(ids, offsets, spans)
        for ids, offsets, (_, spans) in zip(enc["input_ids"], enc["offset_mapping"], rendered)
    ]
    return enc["input_ids"], labels


def _tokenize_batch(batch: dict, tokenizer, max_seq_length: int) -> dict:
    input_ids, labels = tokenize_conversations(tokenizer, batch["messages"])
    # Cut inputs and labels at the same place: labels stay aligned with inputs (the model shifts them itself).
    return {
        "input_ids": [ids[:max_seq_length] for ids in input_ids],
        "labels": [lab[:max_seq_length] for lab in labels],
        "num_tokens": [len(ids) for ids in input_ids],
    }


def _pack_batch(batch: dict, max_seq_length: int) -> dict:
    """Greedily pack consecutive examples into sequences of at most ``max_seq_length`` tokens.

    Position ids restart at 0 for each example: transformers reads the restarts as example boundaries and
    keeps attention inside each example. An example's first token (BOS) has label -100, so no example is
    trained to predict the next one's start.
    """
    out = {"input_ids": [], "labels": [], "position_ids": []}
    cur = None
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        if cur is None or len(cur["input_ids"]) + len(ids) > max_seq_length:
            cur = {"input_ids": [], "labels": [], "position_ids": []}
            for key, packs in out.items():
                packs.append(cur[key])
        cur["input_ids"] += ids
        cur["labels"] += labels
        cur["position_ids"] += range(len(ids))
    return out


# ---------------------------------------------------------------------------------------------------------
# Building the datasets
# ---------------------------------------------------------------------------------------------------------


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
        _tokenize_batch,
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
                _pack_batch,
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


# ---------------------------------------------------------------------------------------------------------
# Collating
# ---------------------------------------------------------------------------------------------------------


@dataclass
class SFTDataCollator:
    """Pad a list of examples into a batch (on the right).

    Plain examples get ``input_ids`` padded with the pad id (the unk id when the tokenizer has no pad token),
    ``labels`` padded with -100 and an ``attention_mask``. Packed examples (with ``position_ids``) get no
    attention mask: padding becomes one more segment whose position ids restart at 0, and transformers builds
    the per-example causal mask from the position ids (sdpa, eager, flex); the ``cu_seq_lens_*`` /
    ``max_length_*`` keyword arguments computed from them let flash-attention's variable-length kernel keep
    the examples apart too.

    Args:
        tokenizer: gives the pad id.
        pad_to_multiple_of: round the padded length up to a multiple of this (e.g. 8 for tensor cores).
    """

    tokenizer: object
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict]) -> dict:
        import torch

        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.unk_token_id
        if pad_id is None:
            raise YakError(
                "the tokenizer has neither a pad nor an unk token to pad with; set tokenizer.pad_token"
            )
        length = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        packed = "position_ids" in features[0]
        input_ids = torch.full((len(features), length), pad_id, dtype=torch.long)  # (B, T)
        labels = torch.full((len(features), length), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(features), length), dtype=torch.long)
        positions = torch.zeros((len(features), length), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            input_ids[i, :n] = torch.as_tensor(f["input_ids"])
            labels[i, :n] = torch.as_tensor(f["labels"])
            mask[i, :n] = 1
            if packed:
                positions[i, :n] = torch.as_tensor(f["position_ids"])
                positions[i, n:] = torch.arange(length - n)
        batch = {"input_ids": input_ids, "labels": labels}
        if not packed:
            batch["attention_mask"] = mask
            return batch
        from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

        (cu_q, cu_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(positions)
        # use_cache=False: with a KV cache (Llama's config default, unless gradient checkpointing is on)
        # transformers ignores the position-id restarts and the examples would attend to each other.
        batch.update(
            position_ids=positions,
            cu_seq_lens_q=cu_q,
            cu_seq_lens_k=cu_k,
            max_length_q=int(max_q),
            max_length_k=int(max_k),
            use_cache=False,
        )
        return batch
