"""The engine's KV cache: one preallocated row ("slot") per request, each written at its own position."""

from __future__ import annotations

import torch


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
