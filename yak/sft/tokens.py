"""SFT sequences: render conversations with the chat template, mask the labels to the answers, truncate,
pack, and pad batches."""

from __future__ import annotations

from dataclasses import dataclass

from yak import YakError

IGNORE_INDEX = -100  # label value that torch's cross-entropy (and transformers' loss) skips


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


def tokenize_batch(batch: dict, tokenizer, max_seq_length: int) -> dict:
    input_ids, labels = tokenize_conversations(tokenizer, batch["messages"])
    # Cut inputs and labels at the same place: labels stay aligned with inputs (the model shifts them itself).
    return {
        "input_ids": [ids[:max_seq_length] for ids in input_ids],
        "labels": [lab[:max_seq_length] for lab in labels],
        "num_tokens": [len(ids) for ids in input_ids],
    }


def pack_batch(batch: dict, max_seq_length: int) -> dict:
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


# ------------------------------------------------------------------------------------------------ collating
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
