"""The continuous-batching engine: many requests, each with its own sampling settings, share one model.

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
import threading
from dataclasses import dataclass
from typing import Sequence

import torch

from yak.generation.cache import _SlotCache
from yak.generation.request import EngineFull, Request
from yak.generation.sampling import SamplingParams, penalise_repeats, sample_next

logger = logging.getLogger(__name__)


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
        request._on_cancel = self._unqueue
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

    def _unqueue(self, request: Request) -> None:
        """``Request.cancel``: a waiting request leaves the queue at once (a running one ends at its next token)."""
        with self._cv:
            try:
                self._queue.remove(request)
            except ValueError:  # running, or done
                return
        request._finish("cancelled")

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
