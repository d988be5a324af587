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

A module per concern, each importing only from those above it:

- :mod:`yak.sft.records`: find, read and check the records (``read_conversations``).
- :mod:`yak.sft.tokens`: render, mask, truncate, pack (``tokenize_conversations``) and pad
  (``SFTDataCollator``).
- :mod:`yak.sft.dataset`: ``SFTDataArguments`` and the cached datasets (``build_sft_datasets``).
"""

from yak.sft.dataset import SFTDataArguments, build_sft_datasets
from yak.sft.records import read_conversations
from yak.sft.tokens import IGNORE_INDEX, SFTDataCollator, tokenize_conversations

__all__ = [
    "IGNORE_INDEX",
    "SFTDataArguments",
    "SFTDataCollator",
    "build_sft_datasets",
    "read_conversations",
    "tokenize_conversations",
]
