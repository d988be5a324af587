"""Generation: prompts from the chat template, per-request sampling, and a continuous-batching engine.

The :class:`Engine` owns the model and one worker thread. Requests (prompt token ids + their own sampling
settings) join a running batch as soon as a slot is free and leave it when they finish, so concurrent callers
share every forward pass instead of queueing behind each other (continuous batching). Each request's keys and
values live in one row ("slot") of a preallocated cache and are written at that row's own position, so rows of
different lengths need no padding. On CUDA every decode step replays a CUDA graph captured at start-up for
that batch size and cache length, which removes the per-kernel launch cost that dominates plain ``generate``
at batch 1 (see ``bench/decode_throughput.py``). A step's inputs (each row's last token and position) stay on
the device, and a greedy row's next token is picked inside the step itself, so while every request is greedy
the host launches step t+1 before it reads step t's tokens, and the device never waits for the host.

Why not ``model.generate``: it takes one sampling configuration per batch, has no way to add or drop rows while
decoding, and streams batch size 1 only. transformers' own continuous batching (5.x) samples or decodes greedily
for the whole batch and its API differs between the 5.17 and 5.24 releases we run on.
"""

from __future__ import annotations

import atexit
import collections
import inspect
import itertools
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Sequence

import torch
from transformers import TextIteratorStreamer

from yak import YakError
from yak.template import LLAMA2_CHAT_TEMPLATE

logger = logging.getLogger(__name__)

# Sampling runs in float32: a temperature below this decodes greedily (as in vLLM), since dividing the logits by
# it would overflow to inf (1e-45 is 0 in float32) and fail the whole batch; a repetition penalty below this
# bound does the same by dividing the logits by it.
MIN_TEMPERATURE = 1e-5
MIN_REPETITION_PENALTY = 0.01


# --------------------------------------------------------------------------------------------------- settings


@dataclass
class SamplingParams:
    """How one request is decoded. ``temperature == 0`` means greedy decoding.

    Args:
        max_new_tokens: generated tokens at most (the prompt does not count).
        temperature: softmax temperature; 0 (or below ``MIN_TEMPERATURE``) picks the most likely token (greedy).
        top_p: nucleus sampling: keep the smallest set of tokens whose probability reaches ``top_p`` (1 = off).
        top_k: keep the ``top_k`` most likely tokens (0 = off).
        repetition_penalty: divide the logits of tokens already in the sequence (CTRL paper; 1 = off).
    """

    max_new_tokens: int = 400
    temperature: float = 0.2
    top_p: float = 0.9
    top_k: int = 40
    repetition_penalty: float = 1.1

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    def problems(self) -> list[str]:
        """Return what is out of range, one sentence per field (empty when valid)."""
        out = []
        if self.max_new_tokens < 1:
            out.append(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not 0 <= self.temperature <= 100:
            out.append(f"temperature must be in [0, 100] (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            out.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            out.append(f"top_k must be 0 (off) or positive, got {self.top_k}")
        if not MIN_REPETITION_PENALTY <= self.repetition_penalty <= 10:
            out.append(f"repetition_penalty must be in [{MIN_REPETITION_PENALTY}, 10], got {self.repetition_penalty}")
        return out


@dataclass
class ModelArguments:
    """Which model to load and where (the original project's flag names)."""

    base_model: str = field(metadata={"help": "Hugging Face model folder: a merged model, or the base model."})
    lora_model: list[str] = field(
        default_factory=list,
        metadata={"help": "Training output folders (stage 1 embeddings and/or LoRA adapters) applied in order on "
                  "top of --base_model; leave out for a merged model."},
    )
    tokenizer_path: str | None = field(
        default=None, metadata={"help": "Tokenizer folder when neither the adapters nor the model folder has one."}
    )
    dtype: str = field(
        default="auto",
        metadata={"help": "Weights dtype: auto (the checkpoint's), bfloat16, float16 or float32."},
    )
    gpus: str | None = field(
        default=None, metadata={"help": "GPU ids to use, e.g. '0,1' (sets CUDA_VISIBLE_DEVICES). Default: all."}
    )
    only_cpu: bool = field(default=False, metadata={"help": "Run on the CPU even when a GPU is present."})
    load_in_8bit: bool = field(default=False, metadata={"help": "Quantize weights to 8 bit (needs bitsandbytes)."})
    load_in_4bit: bool = field(default=False, metadata={"help": "Quantize weights to 4 bit (needs bitsandbytes)."})


@dataclass
class GenerationArguments:
    """Default sampling settings and the engine's capacity (requests may override the sampling settings)."""

    max_new_tokens: int = field(default=400, metadata={"help": "Generated tokens at most per answer."})
    temperature: float = field(default=0.2, metadata={"help": "Sampling temperature; 0 = greedy decoding."})
    top_p: float = field(default=0.9, metadata={"help": "Nucleus sampling threshold (1 = off)."})
    top_k: int = field(default=40, metadata={"help": "Keep the k most likely tokens (0 = off)."})
    repetition_penalty: float = field(default=1.1, metadata={"help": "Penalty on repeated tokens (1 = off)."})
    system_prompt: str | None = field(
        default=None,
        metadata={"help": "System prompt for chat prompts; default: the chat template's own. '' = none."},
    )
    max_batch_size: int = field(default=16, metadata={"help": "Requests decoded together at most."})
    max_total_tokens: int = field(
        default=2048,
        metadata={"help": "Prompt + answer tokens at most per request (KV cache length per slot); capped at "
                  "the model's max_position_embeddings."},
    )
    cuda_graphs: bool = field(
        default=True, metadata={"help": "On CUDA, replay captured CUDA graphs for decode steps (faster)."}
    )
    compile: bool = field(
        default=False,
        metadata={"help": "On CUDA, also torch.compile the decode step: about 1.3x faster decoding, about 3 "
                  "minutes more start-up for a 7B model."},
    )

    def build_engine(self, model, tokenizer, max_queue: int | None = None) -> "Engine":
        """Start an :class:`Engine` for ``model`` with these capacity settings."""
        return Engine(model, stop_token_ids(model, tokenizer), max_batch_size=self.max_batch_size,
                      max_total_tokens=self.max_total_tokens, cuda_graphs=self.cuda_graphs, compile=self.compile,
                      max_queue=max_queue)

    def problems(self) -> list[str]:
        """What is out of range: the sampling settings and the engine's capacity (empty when valid)."""
        out = [f"--{p}" for p in self.sampling().problems()]
        if self.max_batch_size < 1:  # an engine without slots never starts a request: every one would hang
            out.append(f"--max_batch_size must be at least 1, got {self.max_batch_size}")
        if self.max_total_tokens < 2:
            out.append(f"--max_total_tokens must be at least 2 (a prompt token and an answer token), got "
                       f"{self.max_total_tokens}")
        elif self.max_new_tokens >= self.max_total_tokens:  # every request would be refused
            out.append(f"--max_new_tokens {self.max_new_tokens} leaves no room for the prompt in "
                       f"--max_total_tokens {self.max_total_tokens}")
        return out

    def check_room(self, max_total_tokens: int) -> None:
        """Raise a :class:`YakError` when ``--max_new_tokens`` leaves no room for a prompt in the loaded model's
        ``max_total_tokens``, which the engine caps at the model's context: every answer would be refused."""
        if self.max_new_tokens >= max_total_tokens:
            raise YakError(f"--max_new_tokens {self.max_new_tokens} leaves no room for the prompt in the model's "
                           f"{max_total_tokens} positions (its max_position_embeddings, below --max_total_tokens "
                           f"{self.max_total_tokens}); lower --max_new_tokens")

    def sampling(self) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            repetition_penalty=self.repetition_penalty,
        )


# --------------------------------------------------------------------------------------------------- loading


def load_for_inference(args: ModelArguments):
    """Load ``(model, tokenizer)`` for generation, in the checkpoint's dtype, on the GPU unless told otherwise.

    The tokenizer always carries a chat template (the toolkit's Llama 2 one when the folder has none).
    LoRA adapters are merged into the weights, which makes decoding as fast as for a merged model.

    Args:
        args: the model options; see :class:`ModelArguments`.
    """
    problems = []
    if not os.path.isdir(args.base_model):
        problems.append(f"--base_model {args.base_model} is not a folder")
    for a in args.lora_model:
        if not os.path.isdir(a):
            problems.append(f"--lora_model {a} is not a folder")
    if args.load_in_8bit and args.load_in_4bit:
        problems.append("choose one of --load_in_8bit and --load_in_4bit")
    if (args.load_in_8bit or args.load_in_4bit) and args.only_cpu:
        problems.append("--load_in_8bit/--load_in_4bit need a GPU; drop --only_cpu")
    if args.gpus is not None and args.only_cpu:
        problems.append("--gpus and --only_cpu contradict each other")
    if problems:
        raise YakError("; ".join(problems))
    if args.gpus is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = args.gpus  # before CUDA is initialised
    device = "cpu" if args.only_cpu or not torch.cuda.is_available() else "cuda"
    if args.load_in_8bit or args.load_in_4bit:
        model, tokenizer = _load_quantized(args, device)
    else:
        from yak.modeling import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer(args.base_model, adapters=args.lora_model,
                                                    tokenizer_path=args.tokenizer_path, dtype=args.dtype,
                                                    device=device)
    if getattr(tokenizer, "chat_template", None) is None:
        logger.warning("the tokenizer has no chat_template; using the toolkit's Llama 2 template")
        tokenizer.chat_template = LLAMA2_CHAT_TEMPLATE
    logger.info("loaded %s (%s, %s)", args.base_model, next(model.parameters()).dtype, next(model.parameters()).device)
    return model, tokenizer


def _load_quantized(args: ModelArguments, device: str):
    """bitsandbytes 8/4-bit loading of a merged model (LoRA cannot be merged into quantized weights)."""
    import importlib.util

    from yak.modeling import load_base_model
    from yak.tokenizer import load_tokenizer

    if importlib.util.find_spec("bitsandbytes") is None:
        raise YakError("--load_in_8bit/--load_in_4bit need the bitsandbytes package: pip install bitsandbytes "
                       "(CUDA GPUs only)")
    if args.lora_model:
        raise YakError("quantized loading needs a merged model: merge the adapters first with "
                       "merge_lora_low_mem.py, then pass the merged folder as --base_model")
    if device != "cuda":
        raise YakError("--load_in_8bit/--load_in_4bit need a CUDA GPU")
    model = load_base_model(args.base_model, dtype=args.dtype, device=device,
                            load_in_kbits=8 if args.load_in_8bit else 4)
    return model.eval(), load_tokenizer(args.tokenizer_path or args.base_model)


# --------------------------------------------------------------------------------------------------- prompts


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


# --------------------------------------------------------------------------------------------------- sampling


def penalise_repeats(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """Apply the repetition penalty (CTRL paper, as ``generate``): seen tokens' logits are divided by the penalty
    when positive, multiplied when negative.

    Args:
        logits: ``(B, V)`` float logits.
        seen: ``(B, T)`` ids already in each row's sequence (repeats are harmless).
        penalty: ``(B, 1)`` each row's penalty; 1 leaves the row unchanged.
    """
    score = logits.gather(1, seen)
    return logits.scatter(1, seen, torch.where(score < 0, score * penalty, score / penalty))


def sample_next(logits: torch.Tensor, params: Sequence[SamplingParams], seen: torch.Tensor | None) -> torch.Tensor:
    """Pick one token per row with each row's own settings, in ``generate``'s order of processors.

    Args:
        logits: ``(B, V)`` next-token logits.
        params: one :class:`SamplingParams` per row.
        seen: ``(B, T)`` ids already in each row's sequence (for the repetition penalty), or ``None``.

    Returns:
        ``(B,)`` token ids.
    """
    logits = logits.float()
    dev = logits.device
    penalties = [p.repetition_penalty for p in params]
    if seen is not None and any(r != 1.0 for r in penalties):
        logits = penalise_repeats(logits, seen, torch.tensor(penalties, device=dev)[:, None])
    greedy = logits.argmax(-1)  # (B,)
    if all(p.greedy for p in params):
        return greedy
    temp = torch.tensor([1.0 if p.greedy else p.temperature for p in params], device=dev)[:, None]
    logits = logits / temp
    sorted_logits, order = logits.sort(-1, descending=True)  # (B, V)
    vocab = logits.shape[-1]
    k = torch.tensor([min(p.top_k, vocab) or vocab for p in params], device=dev)[:, None]
    ranks = torch.arange(vocab, device=dev)[None, :]
    drop = ranks >= k
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
    top_p = torch.tensor([p.top_p for p in params], device=dev)[:, None]
    # Drop a token when the tokens ranked above it already reach top_p; the first token always stays (also when
    # a tiny top_p is 0 in float32).
    drop |= (probs.cumsum(-1) - probs) >= top_p
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    choice = torch.multinomial(sorted_logits.softmax(-1), 1)  # (B, 1) ranks
    sampled = order.gather(1, choice)[:, 0]
    is_greedy = torch.tensor([p.greedy for p in params], device=dev)
    return torch.where(is_greedy, greedy, sampled)


# --------------------------------------------------------------------------------------------------- requests


class TextStreamer(TextIteratorStreamer):
    """transformers' ``TextIteratorStreamer``, streaming Tibetan syllable by syllable instead of by sentence.

    transformers sends text that ends in a CJK character at once, but holds text with punctuation back until
    the next space, in case a later token changes it. A Tibetan syllable ends in a tsheg (a punctuation mark)
    and Tibetan puts a space only after a shad, so answers came a sentence at a time. Text that ends in a
    Tibetan character (U+0F00-U+0FFF) is as complete as text that ends in a CJK character: nothing after it
    changes it, so it is sent at once too.
    """

    def _is_chinese_char(self, cp: int) -> bool:
        return 0x0F00 <= cp <= 0x0FFF or super()._is_chinese_char(cp)




class Request:
    """One generation request: its prompt, settings, and (as they come) its tokens.

    Args:
        prompt_ids: the prompt's token ids.
        params: its sampling settings.
        streamer: optional object with ``put(tensor)`` / ``end()`` (e.g. transformers'
            ``TextIteratorStreamer``) that receives each generated token as it comes.
    """

    def __init__(self, prompt_ids: Sequence[int], params: SamplingParams, streamer=None):
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.streamer = streamer
        self.output_ids: list[int] = []
        self.finish_reason: str | None = None  # "stop" (end token), "length" (max_new_tokens), "cancelled"
        self.error: BaseException | None = None
        self._done = threading.Event()
        self._cancelled = False

    def cancel(self) -> None:
        """Ask the engine to stop this request (e.g. its client went away)."""
        self._cancelled = True

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> "Request":
        """Block until finished; re-raise the engine's error if the request failed."""
        if not self._done.wait(timeout):
            raise TimeoutError("generation did not finish in time")
        if self.error is not None:
            raise RuntimeError(f"generation failed: {self.error}") from self.error
        return self

    def _emit(self, token: int) -> None:
        self.output_ids.append(token)
        if self.streamer is not None:
            self.streamer.put(torch.tensor([token]))

    def _finish(self, reason: str | None, error: BaseException | None = None) -> None:
        self.finish_reason, self.error = reason, error
        if self.streamer is not None:
            self.streamer.end()
        self._done.set()


class EngineFull(Exception):
    """The engine's queue is full; try again later."""


# --------------------------------------------------------------------------------------------------- KV cache


class _SlotCache:
    """Per-layer K/V of ``max_batch`` rows x ``max_len`` positions; each row is written at its own position.

    It speaks the two methods that transformers' Llama-family attention calls on a cache (``update`` and
    ``get_seq_length``); positions and the 4-D attention mask are always passed explicitly, so nothing else of
    the ``Cache`` interface is used. The backing tensors never move, so CUDA graphs can capture the writes.
    The engine sets the mode before each forward: ``slots`` (prefill of those rows from position 0), or
    ``pos`` and ``cols`` (decode: row b writes at ``pos[b]`` and attends to positions ``0..len(cols)-1``).
    """

    def __init__(self, num_layers: int, max_batch: int, max_len: int):
        self.max_batch, self.max_len = max_batch, max_len
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers
        self.slots: torch.Tensor | None = None  # (N,)
        self.pos: torch.Tensor | None = None  # (B,)
        self.cols: torch.Tensor | None = None  # (L,)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.k[layer_idx] is None:  # allocated on the layer's own device (models split over GPUs)
            b, h, _, d = key_states.shape
            self.k[layer_idx] = key_states.new_zeros(self.max_batch, h, self.max_len, d)
            self.v[layer_idx] = value_states.new_zeros(self.max_batch, h, self.max_len, value_states.shape[-1])
        k, v = self.k[layer_idx], self.v[layer_idx]
        if self.slots is not None:  # prefill (N, H, P, D): a prompt attends only to itself
            n = key_states.shape[2]
            slots = self.slots.to(k.device)
            k[slots, :, :n] = key_states
            v[slots, :, :n] = value_states
            return key_states, value_states
        rows = key_states.shape[0]
        index = torch.arange(rows, device=k.device)
        pos = self.pos.to(k.device)
        k[index, :, pos] = key_states[:, :, 0]  # (B, H, D) into row b at position pos[b]
        v[index, :, pos] = value_states[:, :, 0]
        length = self.cols.shape[0]
        return k[:rows, :, :length], v[:rows, :, :length]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # unused: position ids are always given


# --------------------------------------------------------------------------------------------------- engine


def _buckets(limit: int, start: int) -> list[int]:
    """Powers of two from ``start`` below ``limit``, then ``limit`` itself."""
    sizes = [n for n in (start << i for i in range(32)) if n < limit]
    return sizes + [limit]


@dataclass(eq=False)
class _Slot:
    request: Request
    pos: int  # position of the token that the next launched step feeds (its id is on the device, in Engine._ids)


@dataclass
class _Launched:
    """A decode step enqueued on the device whose tokens the host has not read yet."""

    running: list[tuple[int, _Slot]]  # (slot, its state when the step was launched)
    tokens: torch.Tensor  # (rows,) on the host: each row's new token once ``event`` has passed
    event: torch.cuda.Event | None  # None on the CPU, where the copy is done when launched


class Engine:
    """Continuous-batching generation over one model; thread-safe ``submit``.

    Args:
        model: a transformers causal LM (Llama family) in eval mode.
        eos_token_ids: ids that end an answer (see :func:`stop_token_ids`); empty = never stop early.
        max_batch_size: requests decoded together at most.
        max_total_tokens: prompt + answer tokens at most per request.
        cuda_graphs: capture CUDA graphs for decode steps when the model is on one CUDA device.
        compile: with ``cuda_graphs``, first compile the decode step with ``torch.compile`` (fuses the small
            element-wise kernels: decoding about 1.3x faster, about 3 minutes more start-up for a 7B model).
        prefill_tokens: prompt tokens (padded) prefilled together in one forward at most.
        max_queue: requests waiting at most (``None``: no limit); :meth:`submit` raises :class:`EngineFull`
            beyond.
    """

    def __init__(self, model, eos_token_ids: Sequence[int], max_batch_size: int = 16,
                 max_total_tokens: int = 2048, cuda_graphs: bool = True, compile: bool = False,
                 max_queue: int | None = None, prefill_tokens: int = 8192):
        model_limit = getattr(model.config, "max_position_embeddings", None) or max_total_tokens
        self.max_total_tokens = min(max_total_tokens, model_limit)
        self.max_batch_size = max_batch_size
        self.model = model
        self.eos = set(eos_token_ids)
        self.max_queue = max_queue
        self.prefill_tokens = prefill_tokens
        self.device = model.get_input_embeddings().weight.device
        self.dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        # transformers 5.24 renamed the forward argument past_key_values to cache; 5.17 has only the old name.
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        single_device = len(set(getattr(model, "hf_device_map", {"": self.device}).values())) <= 1
        use_graphs = cuda_graphs and self.device.type == "cuda" and single_device
        compile = compile and use_graphs
        # Like the column index below, the cache has one position more than ever used: then no length bucket
        # spans a whole dimension, and a compiled step is not specialised (recompiled) for the full-length one.
        self.cache = _SlotCache(model.config.num_hidden_layers, max_batch_size, self.max_total_tokens + 1)
        cfg = model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        cache_bytes = 2 * cfg.num_hidden_layers * kv_heads * head_dim * self.dtype.itemsize * max_batch_size * (
            self.max_total_tokens + 1)
        logger.info("KV cache: %d slots x %d tokens = %.2f GB (lower --max_batch_size or --max_total_tokens to "
                    "use less)", max_batch_size, self.max_total_tokens, cache_bytes / 1e9)
        # torch.compile specialises size-1 dimensions, so a compiled engine decodes at least two rows (the
        # second idle) and compiles once for every batch size; the weights are read once either way.
        self._batch_buckets = _buckets(max_batch_size, 2 if compile and max_batch_size > 1 else 1)
        self._len_buckets = _buckets(self.max_total_tokens, 64)
        # The decode step's inputs live on the device and each step writes the next step's into them: the
        # token each row feeds next and its position. Idle rows decode a dummy token in their own (unused) row.
        self._ids = torch.zeros(max_batch_size, 1, dtype=torch.long, device=self.device)
        self._pos = torch.zeros(max_batch_size, dtype=torch.long, device=self.device)
        self._cols = torch.arange(self.max_total_tokens + 1, device=self.device)
        # Ids seen by each slot, for the repetition penalty; unused columns repeat the row's first token. One
        # column more than a request can use: a step launched before its request's end is known writes there.
        self._seen = torch.zeros(max_batch_size, self.max_total_tokens + 1, dtype=torch.long, device=self.device)
        # Per row, copied from the host only when requests join or leave (_upload_rows): does it run (its
        # position advances), does it decode greedily (the step itself writes its next token), its penalty.
        self._running = torch.zeros(max_batch_size, dtype=torch.bool, device=self.device)
        self._greedy = torch.zeros(max_batch_size, dtype=torch.bool, device=self.device)
        self._penalty = torch.ones(max_batch_size, 1, device=self.device)
        self._sampled: list[int] = []  # running slots that sample (their tokens are picked after the step)
        self._sampled_index = torch.zeros(0, dtype=torch.long, device=self.device)
        self._slots: list[_Slot | None] = [None] * max_batch_size
        self._uploaded: tuple[_Slot | None, ...] = tuple(self._slots)  # the slots as the row buffers describe them
        self._queue: collections.deque[Request] = collections.deque()
        self._cv = threading.Condition()
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.peak_running = 0  # most requests ever decoded in one step
        self._step_fn = self._decode_core
        if use_graphs:
            with torch.inference_mode():
                self._prefill([0], [[0]])  # allocates the cache outside any compiled or captured region
            if compile:
                self._step_fn = torch.compile(self._decode_core, dynamic=True)
            self._capture_graphs()
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="yak-engine", daemon=True)
        self._thread.start()
        # A daemon thread still inside torch when the interpreter exits is stopped mid-call, which aborts the
        # process ('terminate called without an active exception', SIGABRT) when a script ends while answering,
        # e.g. on SIGTERM. Stop the worker at exit instead (atexit runs before daemon threads are stopped).
        atexit.register(self.close)

    # ----------------------------------------------------------------------------------------- public

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams, streamer=None) -> Request:
        """Queue a request and return it at once; ``Request.wait()`` blocks until it is done.

        Raises:
            ValueError: empty prompt, invalid settings, or prompt + max_new_tokens over ``max_total_tokens``.
            EngineFull: too many requests are waiting.
        """
        problems = params.problems()
        if not prompt_ids:
            problems.append("the prompt is empty")
        total = len(prompt_ids) + params.max_new_tokens
        if total > self.max_total_tokens:
            problems.append(
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({params.max_new_tokens}) = {total} is over "
                f"the limit of {self.max_total_tokens} tokens; shorten the input or lower max_new_tokens")
        if problems:
            raise ValueError("; ".join(problems))
        request = Request(prompt_ids, params, streamer)
        with self._cv:
            if self._closing:
                raise EngineFull("the engine is shutting down")
            if self.max_queue is not None and len(self._queue) >= self.max_queue:
                raise EngineFull(f"{len(self._queue)} requests are waiting; try again later")
            self._queue.append(request)
            self._cv.notify()
        return request

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
                 progress=None) -> list[Request]:
        """Submit several prompts, wait for all, and return the finished requests in input order.

        Args:
            prompts: token ids per prompt.
            params: one setting for all, or one per prompt.
            progress: optional tqdm-like bar, advanced by one per finished request.
        """
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        requests = [self.submit(p, s) for p, s in zip(prompts, params)]
        for r in requests:  # finish order differs from input order; the bar counts all as they end
            r.wait()
            if progress is not None:
                progress.update(1)
        return requests

    def close(self, timeout: float | None = 30) -> None:
        """Stop the worker after its current step; running and waiting requests fail, later submits too."""
        with self._cv:
            self._closing = True
            self._cv.notify()
        self._thread.join(timeout)

    @property
    def load(self) -> dict:
        """Requests waiting and running (for /health)."""
        return {"waiting": len(self._queue), "running": sum(s is not None for s in self._slots),
                "peak_running": self.peak_running}

    # ----------------------------------------------------------------------------------------- model calls

    def _forward(self, ids, pos_ids, mask, keep):
        out = self.model(input_ids=ids, position_ids=pos_ids, attention_mask=mask, use_cache=True,
                         logits_to_keep=keep, **{self._cache_arg: self.cache})
        return out.logits

    def _decode_core(self, ids: torch.Tensor, pos: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        visible = cols[None, :] <= pos[:, None]  # (B, L)
        mask = torch.zeros(visible.shape, dtype=self.dtype, device=visible.device)
        mask = mask.masked_fill(~visible, torch.finfo(self.dtype).min)[:, None, None, :]  # (B, 1, 1, L)
        return self._forward(ids, pos[:, None], mask, 1)[:, -1]  # (B, V)

    def _decode_step(self, rows: int, length: int) -> torch.Tensor:
        """One decode step of slots ``0..rows-1`` over cache positions ``0..length-1``, on static buffers only.

        Running rows advance their position; greedy rows also take the (penalised) argmax as their next input
        token, so a greedy step needs nothing from the host and the next one can be launched at once. Returns
        the logits ``(rows, V)``, from which the rows that sample pick their token afterwards.
        """
        ids, pos, cols = self._ids[:rows], self._pos[:rows], self._cols[:length]
        self.cache.slots, self.cache.pos, self.cache.cols = None, pos, cols
        logits = self._step_fn(ids, pos, cols)  # (B, V)
        seen, greedy = self._seen[:rows], self._greedy[:rows, None]
        best = penalise_repeats(logits.float(), seen, self._penalty[:rows]).argmax(-1, keepdim=True)  # (B, 1)
        ids.copy_(torch.where(greedy, best, ids))
        pos.add_(self._running[:rows])
        at = pos[:, None]
        seen.scatter_(1, at, torch.where(greedy, best, seen.gather(1, at)))
        return logits

    def _prefill(self, slots: list[int], prompts: list[list[int]]) -> torch.Tensor:
        """Fill the cache rows ``slots`` with ``prompts`` in one forward; return each one's next-token logits."""
        n, longest = len(prompts), max(map(len, prompts))
        # Right padding: pad positions come after a prompt's own, so the causal mask hides them from it, and
        # decoding overwrites them.
        ids = torch.tensor([p + [0] * (longest - len(p)) for p in prompts], device=self.device)
        causal = torch.full((longest, longest), torch.finfo(self.dtype).min, dtype=self.dtype, device=self.device)
        last = torch.tensor([len(p) - 1 for p in prompts], device=self.device)
        self.cache.slots = torch.tensor(slots, device=self.device)
        positions = torch.arange(longest, device=self.device)[None].expand(n, -1)
        logits = self._forward(ids, positions, causal.triu(1)[None, None], last)  # (N, N, V): all rows x all lasts
        self.cache.slots = None
        return logits[torch.arange(n), torch.arange(n)]  # (N, V)

    @torch.inference_mode()
    def _capture_graphs(self) -> None:
        """Capture one CUDA graph per (batch bucket, length bucket); all share one memory pool."""
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        for rows, length in itertools.product(self._batch_buckets, self._len_buckets):
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up outside the graph (allocates the cache, picks kernels)
                for _ in range(2):
                    self._decode_step(rows, length)  # no row runs yet: the input buffers stay as they are
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self._decode_step(rows, length)
            self._graphs[(rows, length)] = (graph, logits)
        torch.cuda.synchronize()
        logger.info("captured %d CUDA graphs (batch %s x length %s)", len(self._graphs), self._batch_buckets,
                    self._len_buckets)

    # ----------------------------------------------------------------------------------------- worker

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not self._queue and not any(self._slots) and not self._closing:
                        self._cv.wait()
                    if self._closing:
                        break
                    admitted = []
                    for slot, s in enumerate(self._slots):
                        if s is None and self._queue:
                            admitted.append((slot, self._queue.popleft()))
                try:
                    self._admit([(slot, r) for slot, r in admitted if not r._cancelled])
                    for _, request in admitted:
                        if request._cancelled:
                            request._finish("cancelled")
                    if any(self._slots):
                        self._decode()
                except Exception as e:  # e.g. out of memory: fail the running requests, keep serving
                    logger.exception("generation failed")
                    for _, request in admitted:
                        if not request.done:
                            request._finish(None, e)
                    for slot, s in enumerate(self._slots):
                        if s is not None:
                            s.request._finish(None, e)
                            self._slots[slot] = None
        closed = RuntimeError("the engine was shut down")
        with self._cv:
            waiting, self._queue = list(self._queue), collections.deque()
        for request in waiting + [s.request for s in self._slots if s is not None]:
            request._finish(None, closed)
        self._slots = [None] * len(self._slots)

    def _admit(self, admitted: list[tuple[int, Request]]) -> None:
        """Prefill new requests in groups of at most ``prefill_tokens`` (padded) tokens; sample their first token."""
        groups: list[list[tuple[int, Request]]] = []
        for item in admitted:
            group = groups[-1] if groups else None
            longest = max([len(r.prompt_ids) for _, r in group or []] + [len(item[1].prompt_ids)])
            if group and (len(group) + 1) * longest <= self.prefill_tokens:
                group.append(item)
            else:
                groups.append([item])
        for group in groups:
            slots = [slot for slot, _ in group]
            for slot, request in group:
                prompt = request.prompt_ids
                self._seen[slot].fill_(prompt[0])
                self._seen[slot, : len(prompt)] = torch.tensor(prompt, device=self.device)
            logits = self._prefill(slots, [r.prompt_ids for _, r in group])
            index = torch.tensor(slots, device=self.device)
            tokens = sample_next(logits, [r.params for _, r in group], self._seen[index])
            first = torch.tensor([len(r.prompt_ids) for _, r in group], device=self.device)  # their position
            self._ids[index, 0] = tokens
            self._pos[index] = first
            self._seen[index, first] = tokens
            for (slot, request), token in zip(group, tokens.tolist()):
                self._slots[slot] = _Slot(request, pos=len(request.prompt_ids))
                self._accept(slot, token)

    def _accept(self, slot: int, token: int) -> None:
        """Hand a new token to the request of ``slot``; finish it on an end token, its length, or a cancel."""
        request = self._slots[slot].request
        if token in self.eos:
            reason = "stop"
        else:
            request._emit(token)
            reason = "length" if len(request.output_ids) >= request.params.max_new_tokens else None
        if request._cancelled:
            reason = "cancelled"
        if reason is not None:
            request._finish(reason)
            self._slots[slot] = None

    def _decode(self) -> None:
        """Decode steps until a waiting request can be admitted, a request samples, or none runs.

        While every running request is greedy, step t+1 is launched before the host reads step t's tokens (its
        inputs are already on the device), so the device computes while the host hands out tokens and feeds
        the streamers. A request that ended at step t simply has its row of step t+1 ignored (no step is run
        ahead when all requests reach their length at step t). Sampled rows build their settings on the host
        in every step, which waits for the device anyway: they are not run ahead.
        """
        step = self._launch()
        while True:
            requests = [s.request for s in self._slots if s is not None]
            outlives = any(len(r.output_ids) + 1 < r.params.max_new_tokens for r in requests)  # step t's length
            greedy = all(r.params.greedy for r in requests)
            admissible = self._queue and len(requests) < len(self._slots)  # unlocked read: at worst a step late
            ahead = self._launch() if outlives and greedy and not admissible and not self._closing else None
            self._collect(step)
            if ahead is None:
                return
            step = ahead

    def _launch(self) -> _Launched:
        """Enqueue one decode step of every running slot and the copy of its new tokens to the host."""
        if tuple(self._slots) != self._uploaded:
            self._upload_rows()
        last = max(i for i, s in enumerate(self._slots) if s is not None)
        rows = next(b for b in self._batch_buckets if b > last)
        running = [(i, s) for i, s in enumerate(self._slots[:rows]) if s is not None]
        length = next(n for n in self._len_buckets if n > max(s.pos for _, s in running))
        self.peak_running = max(self.peak_running, len(running))
        if (rows, length) in self._graphs:
            graph, logits = self._graphs[(rows, length)]
            graph.replay()
        else:
            logits = self._decode_step(rows, length)
        if self._sampled:
            index = self._sampled_index
            params = [self._slots[i].request.params for i in self._sampled]
            tokens = sample_next(logits[index], params, self._seen[index])
            self._ids[index, 0] = tokens
            self._seen[index, self._pos[index]] = tokens  # the step already advanced their positions
        for _, s in running:
            s.pos += 1
        new = self._ids[:rows, 0]
        if self.device.type != "cuda":
            return _Launched(running, new.clone(), None)  # a copy: the next step overwrites the buffer
        tokens = torch.empty(rows, dtype=torch.long, pin_memory=True)
        tokens.copy_(new, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return _Launched(running, tokens, event)

    def _collect(self, step: _Launched) -> None:
        """Wait for ``step``'s tokens and hand each to its request; rows whose request has ended are skipped."""
        if step.event is not None:
            step.event.synchronize()
        tokens = step.tokens.tolist()
        for i, s in step.running:
            if self._slots[i] is s:  # else it ended at the step before, read after this one was launched
                self._accept(i, tokens[i])

    def _upload_rows(self) -> None:
        """Describe the running requests to the device: which rows run, decode greedily, and their penalties."""
        slots = self._slots
        self._running.copy_(torch.tensor([s is not None for s in slots]))
        self._greedy.copy_(torch.tensor([s is not None and s.request.params.greedy for s in slots]))
        self._penalty.copy_(torch.tensor([[s.request.params.repetition_penalty if s else 1.0] for s in slots]))
        self._sampled = [i for i, s in enumerate(slots) if s is not None and not s.request.params.greedy]
        self._sampled_index = torch.tensor(self._sampled, dtype=torch.long, device=self.device)
        self._uploaded = tuple(slots)


# --------------------------------------------------------------------------------------------------- the CLI


@dataclass
class InferenceArguments:
    """What ``inference_hf.py`` does: chat interactively, or answer every line of a file."""

    with_prompt: bool = field(
        default=False,
        metadata={"help": "Wrap inputs in the chat template (for chat/SFT models); off: plain text continuation."},
    )
    interactive: bool = field(default=False, metadata={"help": "Chat on the terminal (streams, keeps history)."})
    data_file: str | None = field(default=None, metadata={"help": "Text file with one input per line."})
    predictions_file: str = field(
        default="predictions.json",
        metadata={"help": "Where file mode writes its answers: .json (a list) or .jsonl (one object per line)."},
    )
    use_vllm: bool = field(default=False, metadata={"help": "Generate with vLLM (merged models; pip install vllm)."})


CLEAR, QUIT = "/clear", "/quit"


class _EngineBackend:
    """Generation through :class:`Engine` (streams in interactive mode)."""

    def __init__(self, model_args: ModelArguments, gen_args: GenerationArguments):
        model, self.tokenizer = load_for_inference(model_args)
        self.engine = gen_args.build_engine(model, self.tokenizer)
        self.max_total_tokens = self.engine.max_total_tokens

    def generate(self, prompts: list[list[int]], params: SamplingParams, progress) -> tuple[list[str], int]:
        """The answers, and how many tokens were generated in all."""
        requests = self.engine.generate(prompts, params, progress=progress)
        texts = [self.tokenizer.decode(r.output_ids, skip_special_tokens=True) for r in requests]
        return texts, sum(len(r.output_ids) for r in requests)

    def chat_once(self, prompt: list[int], params: SamplingParams, on_text) -> str:
        streamer = TextStreamer(self.tokenizer, skip_special_tokens=True)
        request = self.engine.submit(prompt, params, streamer)
        for piece in streamer:
            on_text(piece)
        request.wait()
        return self.tokenizer.decode(request.output_ids, skip_special_tokens=True)


class _VllmBackend:
    """Generation through vLLM; prompts are tokenized by our tokenizer and passed as ids, so both agree."""

    def __init__(self, model_args: ModelArguments, gen_args: GenerationArguments):
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            raise YakError("--use_vllm needs vLLM, which is not installed: pip install vllm (Linux with a CUDA "
                           "GPU); or leave out --use_vllm to generate with transformers")
        if model_args.lora_model or model_args.load_in_8bit or model_args.load_in_4bit or model_args.only_cpu:
            raise YakError("--use_vllm takes a merged model folder on GPUs: merge adapters first with "
                           "merge_lora_low_mem.py and drop --lora_model/--load_in_*bit/--only_cpu")
        from transformers import AutoTokenizer
        from vllm import LLM

        if model_args.gpus is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = model_args.gpus
        self.tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_path or model_args.base_model)
        if getattr(self.tokenizer, "chat_template", None) is None:
            self.tokenizer.chat_template = LLAMA2_CHAT_TEMPLATE
        gpus = len(model_args.gpus.split(",")) if model_args.gpus else max(torch.cuda.device_count(), 1)
        self.llm = LLM(model=model_args.base_model, tokenizer=model_args.tokenizer_path or model_args.base_model,
                       dtype=model_args.dtype, tensor_parallel_size=gpus, max_model_len=gen_args.max_total_tokens)
        self.max_total_tokens = gen_args.max_total_tokens

    def generate(self, prompts: list[list[int]], params: SamplingParams, progress) -> tuple[list[str], int]:
        """The answers, and how many tokens were generated in all."""
        from vllm import SamplingParams as VllmParams

        vp = VllmParams(max_tokens=params.max_new_tokens, temperature=params.temperature, top_p=params.top_p,
                        top_k=params.top_k or -1, repetition_penalty=params.repetition_penalty)
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], vp, use_tqdm=progress is not None)
        return [o.outputs[0].text for o in outputs], sum(len(o.outputs[0].token_ids) for o in outputs)

    def chat_once(self, prompt: list[int], params: SamplingParams, on_text) -> str:
        text = self.generate([prompt], params, None)[0][0]  # vLLM's offline API does not stream
        on_text(text)
        return text


def run_inference(model_args: ModelArguments, gen_args: GenerationArguments, inf_args: InferenceArguments) -> None:
    """``inference_hf.py``: interactive chat or file predictions, with the engine or vLLM."""
    problems = gen_args.problems()
    if inf_args.interactive == (inf_args.data_file is not None):
        problems.append("give exactly one of --interactive and --data_file")
    if inf_args.data_file is not None and not os.path.isfile(inf_args.data_file):
        problems.append(f"--data_file {inf_args.data_file} does not exist")
    if not inf_args.predictions_file.endswith((".json", ".jsonl")):
        problems.append(f"--predictions_file must end in .json or .jsonl, got {inf_args.predictions_file}")
    if os.path.isdir(inf_args.predictions_file):  # found only after every answer was generated
        problems.append(f"--predictions_file {inf_args.predictions_file} is a folder; give a file name")
    elif inf_args.data_file is not None and os.path.abspath(inf_args.predictions_file) == os.path.abspath(
            inf_args.data_file):
        problems.append("--predictions_file is --data_file: the answers would replace the inputs")
    if problems:
        raise YakError("; ".join(problems))
    lines = _read_inputs(inf_args.data_file) if inf_args.data_file else []
    logger.info("options: %s %s %s", model_args, gen_args, inf_args)
    backend = (_VllmBackend if inf_args.use_vllm else _EngineBackend)(model_args, gen_args)
    gen_args.check_room(backend.max_total_tokens)
    if inf_args.interactive:
        _interactive(backend, gen_args, inf_args.with_prompt)
    else:
        _predict_file(backend, gen_args, inf_args, lines)


def _read_inputs(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:  # \r\n and \r read as \n
            text = f.read()
        # not splitlines(): it also splits at U+2028, U+0085, form feeds ..., and answers would shift lines
        lines = text.removesuffix("\n").split("\n") if text else []
    except UnicodeDecodeError as e:
        raise YakError(f"--data_file {path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    empty = [str(i + 1) for i, line in enumerate(lines) if not line.strip()]
    if not lines or empty:
        raise YakError(f"--data_file {path}: " + (f"empty lines {', '.join(empty[:10])}" if empty else "no lines")
                       + "; give one input per line")
    return lines


def _prompt(tokenizer, text: str, history: list, gen_args: GenerationArguments, with_prompt: bool) -> list[int]:
    if not with_prompt:
        return encode_raw(tokenizer, text)
    return encode_chat(tokenizer, chat_messages(text, history, gen_args.system_prompt))


def _predict_file(backend, gen_args: GenerationArguments, inf_args: InferenceArguments, lines: list[str]) -> None:
    import json
    import time

    from tqdm import tqdm

    from yak.io import atomic_write_text

    params = gen_args.sampling()
    prompts = []
    for i, line in enumerate(lines):
        try:
            prompts.append(_prompt(backend.tokenizer, line, [], gen_args, inf_args.with_prompt))
        except ValueError as e:
            raise YakError(f"--data_file {inf_args.data_file}, line {i + 1}: {e}") from None
    too_long = [str(i + 1) for i, p in enumerate(prompts) if len(p) + params.max_new_tokens > backend.max_total_tokens]
    if too_long:
        raise YakError(f"--data_file {inf_args.data_file}: lines {', '.join(too_long[:10])} do not fit "
                       f"--max_total_tokens {backend.max_total_tokens} with --max_new_tokens "
                       f"{params.max_new_tokens}; raise the first or lower the second")
    start = time.perf_counter()
    with tqdm(total=len(prompts), desc="generating", unit="input") as bar:
        outputs, tokens = backend.generate(prompts, params, bar)
    seconds = time.perf_counter() - start
    records = [{"id": i, "input": line, "output": out} for i, (line, out) in enumerate(zip(lines, outputs))]
    if inf_args.predictions_file.endswith(".jsonl"):
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    else:
        text = json.dumps(records, ensure_ascii=False, indent=2) + "\n"
    atomic_write_text(inf_args.predictions_file, text)
    print(f"\n| inputs | answer tokens | seconds | tokens/s |\n|---|---|---|---|\n"
          f"| {len(lines)} | {tokens} | {seconds:.1f} | {tokens / seconds:.1f} |\n"
          f"predictions: {inf_args.predictions_file}")


def _interactive(backend, gen_args: GenerationArguments, with_prompt: bool) -> None:
    import sys

    params = gen_args.sampling()
    history: list[list[str]] = []
    mode = "chat, the conversation is kept" if with_prompt else "plain text continuation"
    print(f"Interactive mode ({mode}). Commands: {CLEAR} forgets the conversation, {QUIT} exits.", flush=True)
    while True:
        try:
            line = input("user> ").strip()
        except EOFError:
            break
        if line == QUIT:
            break
        if line == CLEAR:
            history.clear()
            print("(conversation cleared)", flush=True)
            continue
        if not line:
            continue
        try:
            prompt = _prompt(backend.tokenizer, line, history, gen_args, with_prompt)
        except ValueError as e:
            print(f"({e})", flush=True)
            continue
        while len(prompt) + params.max_new_tokens > backend.max_total_tokens and history:
            history.pop(0)  # forget the oldest turn rather than refuse the question
            prompt = _prompt(backend.tokenizer, line, history, gen_args, with_prompt)
        if len(prompt) + params.max_new_tokens > backend.max_total_tokens:
            print(f"(input too long: {len(prompt)} tokens + --max_new_tokens {params.max_new_tokens} > "
                  f"--max_total_tokens {backend.max_total_tokens})", flush=True)
            continue
        print("assistant> ", end="", flush=True)
        answer = backend.chat_once(prompt, params, lambda t: print(t, end="", flush=True))
        print(flush=True)
        if with_prompt:
            history.append([line, answer])
    sys.stdout.flush()
