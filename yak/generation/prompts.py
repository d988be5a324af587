"""Prompts: chat messages through the tokenizer's chat template, plain text, and the ids that end an
answer."""

from __future__ import annotations

from typing import Sequence


def chat_messages(query: str, history: Sequence[Sequence[str]] = (), system_prompt: str | None = None) -> list[dict]:
    """Turn ``(query, [[user, assistant], ...], system_prompt)`` into chat-template messages.

    Args:
        query: the new user message.
        history: earlier turns, oldest first, as ``[user, assistant]`` pairs.
        system_prompt: replaces the template's default system prompt when not ``None`` (``""`` = none).
    """
    messages = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    for user, assistant in history:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return messages + [{"role": "user", "content": query}]


def encode_chat(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of ``messages`` formatted by the tokenizer's chat template, ready for the answer.

    Raises:
        ValueError: a message holds the text of a special token (``</s>``, ``<s>``, ...). The rendered
            conversation is encoded with special tokens on, so that text would become the control token
            itself: a user could end a turn or open a new one. Training data refuses it too (yak.sft).
    """
    specials = [t for t in tokenizer.all_special_tokens if t]
    for m in messages:
        found = [t for t in specials if t in m["content"]]
        if found:
            raise ValueError(f"a {m['role']} message contains {found[0]!r}, the text of a control token; "
                             "remove it")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # The template writes the BOS token itself, so the tokenizer must not add another one.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_raw(tokenizer, text: str) -> list[int]:
    """Token ids for plain text continuation (no template), with the tokenizer's BOS.

    The text is taken as text: ``</s>`` in it is encoded as its characters, not as the end token (which would
    end the prompt's document where the user did not).
    """
    return tokenizer(text, split_special_tokens=True)["input_ids"]


def stop_token_ids(model, tokenizer) -> tuple[int, ...]:
    """The ids that end an answer: the tokenizer's EOS and the model's generation-config EOS ids."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
    return tuple(sorted(ids))
