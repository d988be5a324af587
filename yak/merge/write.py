"""Write the merged tensors as they are computed: Hugging Face safetensors shards, or Meta's ``.pth`` parts."""

from __future__ import annotations

import json
import math
import mmap
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from yak.formats import EMBED_KEY, LM_HEAD_KEY, SAFETENSORS_DTYPES, SAFETENSORS_TORCH
from yak.io import atomic_write_json
from yak.merge.compute import iter_merged
from yak.merge.meta import META_SHARDS_BY_HIDDEN, meta_name, meta_params, unpermute
from yak.merge.plan import Plan, output_bytes


class StreamingSafetensorsWriter:
    """Write a safetensors file one tensor at a time.

    ``safetensors.torch.save_file`` needs every tensor of a file in memory at once; here the header (names,
    dtypes, shapes, offsets) is written first from the plan, and each tensor's bytes are appended as it is
    computed, so a shard never has to be held in memory. The layout is safetensors' spec: an 8-byte
    little-endian header length, the JSON header padded with spaces to 8 bytes, then the data.
    """

    def __init__(self, path: Path, specs: list[tuple[str, tuple[int, ...], torch.dtype]]):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, dtype in specs:
            n = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.expected = [(n, tuple(s), d) for n, s, d in specs]
        self.path, self.pos = path, 0
        self.file = open(path, "wb")
        self.file.write(len(raw).to_bytes(8, "little") + raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        assert (name, tuple(tensor.shape), tensor.dtype) == self.expected[self.pos], (name, self.pos)
        self.file.write(tensor.contiguous().view(-1).view(torch.uint8).numpy().data)
        self.pos += 1

    def close(self) -> None:
        assert self.pos == len(self.expected), f"{self.path}: {self.pos}/{len(self.expected)} tensors"
        self.file.close()


def _shard_specs(plan: Plan, max_bytes: int) -> list[list[tuple[str, tuple[int, ...], torch.dtype]]]:
    shards, size = [[]], 0
    for name in plan.order:
        n = math.prod(plan.shapes[name]) * plan.dtype.itemsize
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, plan.shapes[name], plan.dtype))
        size += n
    return shards


def write_huggingface(plan: Plan, out: Path) -> list[str]:
    shards = _shard_specs(plan, plan.shard_bytes)
    n = len(shards)
    file_names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                                                       for i in range(n)]
    weight_map = {}
    merged = iter_merged(plan)
    for specs, fname in zip(shards, file_names):
        writer = StreamingSafetensorsWriter(out / fname, specs)
        for spec in specs:
            name, tensor = next(merged)
            writer.write(name, tensor)
            weight_map[name] = fname
        writer.close()
    if n > 1:
        atomic_write_json(out / "model.safetensors.index.json",
                          {"metadata": {"total_size": output_bytes(plan)}, "weight_map": weight_map})
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(plan.base_dir)
    config.vocab_size = plan.vocab_size
    config.tie_word_embeddings = plan.tied
    config.dtype = plan.dtype
    config.save_pretrained(out)
    gen = plan.base_dir / "generation_config.json"
    if gen.is_file():
        shutil.copy2(gen, out / gen.name)
    return file_names


# ----------------------------------------------------------------------------------------------- Meta .pth


def write_pth(plan: Plan, out: Path, num_shards: int | None) -> list[str]:
    cfg = plan.config
    mp = num_shards or META_SHARDS_BY_HIDDEN.get(cfg["hidden_size"], 1)
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or heads
    names = list(plan.order)
    if plan.tied:  # Meta has no tying: output.weight is written, right after the embedding it copies
        names.insert(names.index(EMBED_KEY) + 1, LM_HEAD_KEY)
    specs: list[list] = [[] for _ in range(mp)]
    for name in names:
        meta, dim = meta_name(name)
        shape = list(plan.shapes[EMBED_KEY if name == LM_HEAD_KEY and plan.tied else name])
        if dim is not None:
            shape[dim] //= mp
        for s in specs:
            s.append((meta, tuple(shape), plan.dtype))
    # Stream the pieces into one safetensors file per part, then re-save each part as Meta's pickle from
    # memory-mapped tensors, so that not even one part has to fit in memory.
    parts = [out / f".consolidated.{i:02d}.safetensors" for i in range(mp)]
    writers = [StreamingSafetensorsWriter(p, s) for p, s in zip(parts, specs)]
    for name, tensor in iter_merged(plan):
        for hf_name in [name, LM_HEAD_KEY] if plan.tied and name == EMBED_KEY else [name]:
            meta, dim = meta_name(hf_name)
            if hf_name.endswith("q_proj.weight"):
                tensor = unpermute(tensor, heads)
            elif hf_name.endswith("k_proj.weight"):
                tensor = unpermute(tensor, kv)
            pieces = tensor.chunk(mp, dim) if dim is not None else [tensor] * mp
            for w, piece in zip(writers, pieces):
                w.write(meta, piece)
    files = []
    for i, (w, part) in enumerate(zip(writers, parts)):
        w.close()
        with _mmap_safetensors(part) as tensors:
            torch.save(tensors, out / f"consolidated.{i:02d}.pth")
        part.unlink()
        files.append(f"consolidated.{i:02d}.pth")
    atomic_write_json(out / "params.json", meta_params(cfg, plan.vocab_size))
    return files


@contextmanager
def _mmap_safetensors(path: Path) -> Iterator[dict[str, torch.Tensor]]:
    """Tensors of a safetensors file that share the file's pages (``torch.frombuffer`` over an mmap)."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        n = int.from_bytes(mm[:8], "little")
        header = json.loads(mm[8:8 + n])
        header.pop("__metadata__", None)
        tensors = {}
        with warnings.catch_warnings():  # read-only buffer: the tensors are only read
            warnings.simplefilter("ignore", UserWarning)
            for name, h in header.items():
                dtype = SAFETENSORS_TORCH[h["dtype"]]
                begin, end = h["data_offsets"]
                tensors[name] = torch.frombuffer(mm, dtype=dtype, count=(end - begin) // dtype.itemsize,
                                                 offset=8 + n + begin).view(h["shape"])
        yield tensors
        del tensors
