"""The model side of evaluation: load a model, score continuations, roll windows over documents, generate.

All scores are sums of natural-log probabilities computed in float32, whatever the model's dtype, and every
request is scored independently of its batch (right padding with an attention mask; left padding for
generation), so results do not depend on the batch size beyond float noise.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from yak import YakError
from yak.modeling import load_model_and_tokenizer
from yak.source import ModelSource

logger = logging.getLogger(__name__)


@dataclass
class ModelSpec:
    """A model to evaluate: its name in the report, and its :class:`ModelSource`."""

    name: str
    source: ModelSource

    @classmethod
    def parse(cls, text: str, dtype: str = "auto") -> ModelSpec:
        """Parse ``[NAME=]BASE[,ADAPTER1[,ADAPTER2]]`` (adapters apply in order: stage 1, CPT, SFT)."""
        name, _, paths = text.partition("=") if "=" in text else ("", "", text)
        try:
            source = ModelSource.parse(paths, dtype=dtype)
        except YakError as e:
            raise YakError(f"model {e} ([NAME=]BASE[,ADAPTER...])") from e
        name = name or os.path.basename(os.path.normpath(([source.base_model] + source.adapters)[-1]))
        if not re.fullmatch(r"[\w.+-]+", name):  # it names a folder of predictions/
            raise YakError(f"model name {name!r}: use letters, digits, '.', '_', '+', '-' (NAME=DIR)")
        return cls(name=name, source=source)

    def problems(self) -> list[str]:
        """What is missing on disk, checked before anything is loaded."""
        return self.source.problems(where=f"model {self.name}")


def load_model(spec: ModelSpec, device: str = "auto"):
    """Load ``spec`` for evaluation (eval mode, no gradients); a load failure becomes a YakError naming it.

    Returns:
        ``(model, tokenizer)``.
    """
    try:
        model, tokenizer = load_model_and_tokenizer(spec.source, device=device)
    except YakError as e:
        raise YakError(f"model {spec.name}: {e}") from e
    except Exception as e:  # any library error: name the model and the cause, not a long traceback
        raise YakError(
            f"model {spec.name} ({spec.source.base_model}) could not be loaded: {type(e).__name__}: {e}"
        ) from e
    model.eval()
    return model, tokenizer


class Scorer:
    """Scores text with one causal LM: continuation log-likelihoods, rolling document NLL, greedy generation.

    Args:
        model: a causal LM in eval mode.
        tokenizer: its tokenizer.
        max_length: the longest token sequence fed to the model (longer inputs are cut on the left).
        batch_size: sequences per forward pass.
        chat_template: wrap prompts in the tokenizer's chat template (instruction-tuned models).
    """

    def __init__(self, model, tokenizer, max_length: int, batch_size: int = 8, chat_template: bool = False):
        self.model, self.tokenizer = model, tokenizer
        if chat_template and not getattr(tokenizer, "chat_template", None):
            raise YakError(
                "--chat_template: this model's tokenizer has no chat_template (tokenizer_config.json)"
            )
        self.max_length, self.batch_size, self.chat_template = max_length, batch_size, chat_template
        self.device = next(model.parameters()).device
        self.pad_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        )

    # -- tokenisation --
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens."""
        return self.tokenizer(
            text, add_special_tokens=False, verbose=False
        ).input_ids  # long documents are windowed

    def encode_text(self, text: str) -> list[int]:
        """Token ids of plain text: BOS + text."""
        bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        return bos + self.encode(text)

    def encode_prompt(self, prompt: str, continuation: str = "") -> list[int]:
        """Token ids of a prompt and what follows it: BOS + text, or the chat-templated prompt (which brings its
        own BOS) with the continuation after it, where the assistant's answer goes."""
        if self.chat_template:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            return self.encode(text + continuation)
        return self.encode_text(prompt + continuation)

    # -- scoring --
    @torch.no_grad()
    def score(self, requests: list[tuple[list[int], int]], desc: str = "scoring") -> list[tuple[float, bool]]:
        """Score the last ``n`` tokens of each ``(input_ids, n)`` given the tokens before them.

        Returns:
            per request ``(sum of log-probabilities in nats, whether every scored token was the argmax)``.
        """
        order = sorted(
            range(len(requests)), key=lambda i: -len(requests[i][0])
        )  # similar lengths batch together
        out: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        for start in tqdm(
            range(0, len(order), self.batch_size),
            desc=desc,
            leave=False,
            disable=len(order) < 2 * self.batch_size,
        ):
            idx = order[start : start + self.batch_size]
            width = max(len(requests[i][0]) for i in idx)
            ids = torch.full((len(idx), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                seq = requests[i][0]
                ids[row, : len(seq)] = torch.tensor(seq)
                mask[row, : len(seq)] = 1
            # Only the last `keep` positions carry scored tokens: skip the LM head elsewhere (vocab-sized).
            keep = max(width - len(requests[i][0]) + requests[i][1] + 1 for i in idx)
            logits = self.model(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device), logits_to_keep=keep
            ).logits  # (B, keep, V): positions width - keep ... width - 1
            for row, i in enumerate(idx):
                seq, n = requests[i]
                assert 0 < n < len(seq), "need at least one context token before the scored ones"
                end = len(seq) - 1 - (width - keep)
                pos = logits[row, end - n : end].float().log_softmax(-1)  # (n, V)
                target = torch.tensor(seq[len(seq) - n :], device=pos.device)
                logp = pos.gather(-1, target[:, None]).squeeze(-1)
                out[i] = (logp.sum().item(), bool((pos.argmax(-1) == target).all()))
        return out

    def loglikelihoods(
        self, pairs: list[tuple[str, str]], desc: str = "scoring"
    ) -> tuple[list[float], list[bool]]:
        """Log-likelihood of each continuation given its context.

        The continuation's tokens are those of ``context + continuation`` beyond the context's own tokens, so
        a tokenizer that merges across the boundary is still scored on the full text. Contexts longer than
        ``max_length`` are cut on the left.

        Returns:
            ``(log-likelihoods in nats, whether each context was cut)``.
        """
        requests, truncated, cache = [], [], {}
        for context, continuation in pairs:
            if context not in cache:
                cache[context] = self.encode_prompt(context)
            ctx = cache[context]
            whole = self.encode_prompt(context, continuation)
            n = max(1, len(whole) - len(ctx))
            truncated.append(len(whole) > self.max_length)
            if truncated[-1]:
                whole = whole[-self.max_length :]
                n = min(n, len(whole) - 1)
            requests.append((whole, n))
        return [s for s, _ in self.score(requests, desc)], truncated

    def rolling_nll(self, texts: list[str], stride: int, desc: str = "windows") -> list[tuple[float, int]]:
        """Negative log-likelihood of whole documents with a sliding window.

        Each token is scored exactly once, with at least ``max_length - stride`` tokens of context (fewer only
        at the start of a document); ``stride = max_length - 1`` gives disjoint windows.

        Returns:
            per document ``(NLL in nats, number of scored tokens)``.
        """
        if not 1 <= stride < self.max_length:
            raise YakError(
                f"stride must be between 1 and max_length - 1 = {self.max_length - 1}, found {stride}"
            )
        requests, owner = [], []
        for d, text in enumerate(texts):
            # BOS + text, never the chat template: its tokens would be scored too, but not counted in the bytes
            tokens = self.encode_text(text)  # the first token is predicted from BOS
            start = 1
            while start < len(tokens):
                end = min(start + stride, len(tokens))
                requests.append((tokens[max(0, end - self.max_length) : end], end - start))
                owner.append(d)
                start = end
        totals = [[0.0, 0] for _ in texts]
        for (s, _), d, (_, n) in zip(self.score(requests, desc), owner, requests):
            totals[d][0] -= s
            totals[d][1] += n
        return [(nll, n) for nll, n in totals]

    @torch.no_grad()
    def generate(
        self, prompts: list[str], max_new_tokens: int, stop: list[str], desc: str = "generating"
    ) -> tuple[list[str], int]:
        """Greedy continuations of ``prompts``, cut at the first stop string.

        Returns:
            ``(texts, number of prompts cut on the left to fit max_length - max_new_tokens)``.
        """
        budget = self.max_length - max_new_tokens
        if budget < 1:
            raise YakError(
                f"max_new_tokens={max_new_tokens} leaves no room for the prompt in "
                f"max_length={self.max_length}"
            )
        encoded, truncated = [], 0
        for p in prompts:
            ids = self.encode_prompt(p)
            if len(ids) > budget:
                truncated += 1
                ids = ids[-budget:]
            encoded.append(ids)
        order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
        out = [""] * len(prompts)
        for start in tqdm(range(0, len(order), self.batch_size), desc=desc, leave=False):
            idx = order[start : start + self.batch_size]
            width = max(len(encoded[i]) for i in idx)
            ids = torch.full((len(idx), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):  # left padding: every prompt ends where generation starts
                ids[row, width - len(encoded[i]) :] = torch.tensor(encoded[i])
                mask[row, width - len(encoded[i]) :] = 1
            gen = self.model.generate(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=self.pad_id,
                stop_strings=stop or None,
                tokenizer=self.tokenizer,
            )
            for row, i in enumerate(idx):
                text = self.tokenizer.decode(gen[row, width:], skip_special_tokens=True).lstrip()
                for s in stop:
                    text = text.split(s)[0]
                out[i] = text.strip()
        return out, truncated
