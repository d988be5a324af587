"""Low-memory merge of stage-1 embeddings and LoRA adapters into a Llama base model.

The merge streams: every output tensor is computed on its own (in float32, from memory-mapped base and
adapter files), checked for NaN/inf, cast to the output dtype and appended to the output file, so the
resident memory stays near one base shard plus one tensor, whatever the model size. Two layouts are written:

* ``huggingface``: ``model-0000i-of-0000N.safetensors`` shards with ``model.safetensors.index.json``,
  ``config.json`` (with the merged ``vocab_size`` and tying), the generation config and the tokenizer;
* ``pth``: Meta's layout, ``consolidated.NN.pth`` split for model parallelism as Meta splits 7B/13B/70B,
  ``params.json``, the q/k rotary permutation of the Hugging Face conversion undone, and the tokenizer.

Inputs apply in order, as training produced them: base -> resized vocabulary -> stage-1 embeddings
(``yak_adapter.json`` + ``embeddings.safetensors``) -> peft LoRA adapters (CPT, then SFT), whose
``modules_to_save`` carry the full trained embeddings. Everything is validated before anything is written.
"""

from __future__ import annotations

import json
import logging
import math
import mmap
import re
import shutil
import time
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from yak import YakError
from yak.formats import (
    ADAPTER_WEIGHTS,
    BASE_WEIGHTS,
    DTYPES,
    EMBED_KEY,
    EMBEDDINGS_FILES,
    LM_HEAD_KEY,
    MERGE_FILE,
    PEFT_PREFIX,
    SAFETENSORS_DTYPES,
    SAFETENSORS_TORCH,
    TOKENIZER_FILES,
    YAK_ADAPTER_FILE,
    WeightHandle,
    WeightIndex,
    adapter_base_problems,
    base_record,
    check_model_folder,
    merged_adapters,
    open_weights,
    padded_vocab_size,
    read_stage1,
    weight_files,
    weights_in,
)
from yak.io import atomic_write_json, read_json
from yak.outdir import inputs_inside, output_dir_problems, replace_dir
from yak.source import ModelSource

logger = logging.getLogger(__name__)

# Meta splits its checkpoints for model parallelism by size: 7B -> 1 file, 13B -> 2, 33/34B -> 4, 65/70B -> 8.
META_SHARDS_BY_HIDDEN = {4096: 1, 5120: 2, 6656: 4, 8192: 8}
# Hugging Face name (after "model.layers.N.") -> Meta name (after "layers.N.") and the dimension Meta splits
# it along (0: column parallel, 1: row parallel, None: replicated).
META_LAYER_NAMES = {
    "self_attn.q_proj.weight": ("attention.wq.weight", 0),
    "self_attn.k_proj.weight": ("attention.wk.weight", 0),
    "self_attn.v_proj.weight": ("attention.wv.weight", 0),
    "self_attn.o_proj.weight": ("attention.wo.weight", 1),
    "mlp.gate_proj.weight": ("feed_forward.w1.weight", 0),
    "mlp.down_proj.weight": ("feed_forward.w2.weight", 1),
    "mlp.up_proj.weight": ("feed_forward.w3.weight", 0),
    "input_layernorm.weight": ("attention_norm.weight", None),
    "post_attention_layernorm.weight": ("ffn_norm.weight", None),
}
META_TOP_NAMES = {EMBED_KEY: ("tok_embeddings.weight", 1), "model.norm.weight": ("norm.weight", None),
                  LM_HEAD_KEY: ("output.weight", 0)}


@dataclass
class MergeArguments:
    """Where and how the merged model is written (what is merged: :class:`yak.source.ModelSource`, whose
    --base_model may hold safetensors or .bin shards, and whose --adapters are stage-1 outputs and/or peft LoRA
    adapters, e.g. stage1_dir,cpt_adapter,sft_adapter; --dtype is the output's, auto: the base model's)."""

    output_dir: str = field(metadata={"help": "Folder to write; created atomically (nothing is left behind "
                                              "on failure)."})
    output_type: str = field(default="huggingface", metadata={
        "help": "huggingface (safetensors shards) or pth (Meta's consolidated.NN.pth + params.json)."})
    max_shard_size: str = field(default="5GB", metadata={
        "help": "Largest Hugging Face output shard, e.g. 2GB or 500MB."})
    num_shards: int | None = field(default=None, metadata={
        "help": "pth only: number of consolidated.NN.pth files (model-parallel parts). Default: as Meta "
                "splits its models (hidden size 4096 -> 1, 5120 -> 2, 6656 -> 4, 8192 -> 8; else 1)."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing --output_dir."})
    verbose: bool = field(default=False, metadata={
        "help": "Detailed logs (the original script's flag): each tensor as it is merged, with its shape, dtype and "
                "the source file it is read from."})


# ----------------------------------------------------------------------------------------------- reading


def _read_checkpoint(files: list[Path], problems: list[str]) -> WeightIndex | None:
    """The names and shapes of ``files``, or None with the problem noted (a truncated or corrupt file)."""
    try:
        return WeightIndex(files)
    except YakError as e:
        problems.append(str(e))
        return None


# ----------------------------------------------------------------------------------------------- planning


@dataclass
class _Step:
    """One input folder applied on top of the base: full replacements, then LoRA deltas."""

    path: Path
    kind: str  # "stage1" or "lora"
    weights: WeightIndex
    replacements: dict[str, str] = field(default_factory=dict)  # base name -> key in weights
    loras: dict[str, tuple[str, str, float, bool]] = field(default_factory=dict)  # name -> (A, B, scale, emb)
    ties_lm_head: bool = False  # when given the embedding only, lm_head keeps following it


@dataclass
class _Op:
    step: _Step
    kind: str  # "replace" or "lora"


@dataclass
class _Plan:
    base: WeightIndex
    steps: list[_Step]
    ops: dict[str, list[_Op]]  # output name -> ops, in order
    source: dict[str, str]  # output name -> base tensor it starts from
    shapes: dict[str, tuple[int, ...]]
    order: list[str]  # output names, grouped by base file
    group: dict[str, Path]  # output name -> base file to open for it
    vocab_size: int
    tied: bool
    config: dict
    dtype: torch.dtype
    tokenizer_dir: Path
    base_dir: Path
    shard_bytes: int


def _read_json(path: Path, problems: list[str]) -> dict | None:
    try:
        return read_json(path)
    except YakError as e:
        problems.append(str(e))
        return None


def _load_step(path: Path, problems: list[str]) -> _Step | None:
    """Read one --adapters folder (stage-1 output or peft LoRA adapter); report what is wrong with it."""
    if not path.is_dir():  # reported by ModelSource.problems
        return None
    if (path / YAK_ADAPTER_FILE).is_file():
        try:
            meta = read_stage1(path)
        except YakError as e:
            problems.append(str(e))
            return None
        emb = weights_in(path, EMBEDDINGS_FILES)
        w = _read_checkpoint([emb], problems)
        if w is None:
            return None
        extra = set(w.shapes) - {EMBED_KEY, LM_HEAD_KEY}
        if extra or EMBED_KEY not in w.shapes:
            problems.append(f"{emb}: expected {EMBED_KEY} (and {LM_HEAD_KEY} when untied), found {sorted(w.shapes)}")
            return None
        return _Step(path, "stage1", w, replacements={k: k for k in w.shapes},
                     ties_lm_head=bool(meta.get("tie_word_embeddings", False)))
    if not (path / "adapter_config.json").is_file():
        have = sorted(p.name for p in path.iterdir())[:12]
        problems.append(f"--adapters {path}: neither adapter_config.json (peft LoRA adapter) nor "
                        f"yak_adapter.json (stage-1 output); found {have}")
        return None
    cfg = _read_json(path / "adapter_config.json", problems)
    files = weight_files(path, ADAPTER_WEIGHTS)
    if cfg is None:
        return None
    if files is None:
        problems.append(f"{path}: adapter_config.json without adapter_model.safetensors or adapter_model.bin")
        return None
    unsupported = [name for name, bad in [
        (f"peft_type={cfg.get('peft_type')}", cfg.get("peft_type", "LORA") != "LORA"),
        ("use_dora", bool(cfg.get("use_dora"))),
        (f"bias={cfg.get('bias')}", cfg.get("bias", "none") != "none"),
        ("lora_bias", bool(cfg.get("lora_bias"))),
        ("fan_in_fan_out", bool(cfg.get("fan_in_fan_out"))),
        ("layer_replication", bool(cfg.get("layer_replication"))),
        ("trainable_token_indices", bool(cfg.get("trainable_token_indices"))),
    ] if bad]
    if unsupported:
        problems.append(f"{path / 'adapter_config.json'}: unsupported settings {unsupported}; merge this "
                        "adapter with peft's merge_and_unload() instead")
        return None
    w = _read_checkpoint(files, problems)
    if w is None:
        return None
    step = _Step(path, "lora", w, ties_lm_head=bool(cfg.get("ensure_weight_tying", False)))
    halves: dict[str, dict[str, str]] = {}
    for key in w.shapes:
        if not key.startswith(PEFT_PREFIX):
            problems.append(f"{path}: tensor {key} does not start with {PEFT_PREFIX!r}; not a peft adapter "
                            "of a causal LM")
            continue
        name = key[len(PEFT_PREFIX):]
        # peft's save_embedding_layers also stores these duplicates of the trained and the original module
        if ".original_module." in name or ".modules_to_save." in name:
            continue
        m = re.fullmatch(r"(.+)\.lora_(A|B)\.weight|(.+)\.lora_embedding_(A|B)", name)
        if m:
            module = m[1] or m[3]
            halves.setdefault(module, {})[("emb_" if m[3] else "") + (m[2] or m[4])] = key
        else:  # modules_to_save, or a full layer stored by save_embedding_layers
            step.replacements[name.replace(".base_layer.weight", ".weight")] = key
    alpha_pattern = cfg.get("alpha_pattern") or {}
    for module, h in halves.items():
        emb = "emb_A" in h or "emb_B" in h
        a, b = (h.get("emb_A"), h.get("emb_B")) if emb else (h.get("A"), h.get("B"))
        if a is None or b is None:
            problems.append(f"{path}: LoRA module {module} has only one of its A/B matrices")
            continue
        r = w.shapes[a][0]
        pattern = next((p for p in alpha_pattern if re.match(rf"(.*\.)?({p})$", module)), None)
        alpha = alpha_pattern[pattern] if pattern else cfg.get("lora_alpha", 8)
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        step.loras[f"{module}.weight"] = (a, b, scale, emb)
    return step


def _delta_shape(step: _Step, name: str) -> tuple[int, ...]:
    a, b, _, emb = step.loras[name]
    out = (step.weights.shapes[b][0], step.weights.shapes[a][1])
    return out[::-1] if emb else out  # peft's embedding LoRA stores the transposed factors


def _parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)B?\s*", text.upper())
    if not m:
        raise YakError(f"--max_shard_size {text!r}: expected a size such as 2GB or 500MB")
    return int(float(m[1]) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m[2]])


def plan_merge(source: ModelSource, args: MergeArguments) -> _Plan:
    """Read every input's names and shapes (no tensor data), check them, and plan every output tensor.

    Raises:
        YakError: listing every problem found (missing files, an adapter made for another base, a tokenizer
            whose size disagrees with the embeddings, an output folder that is an input, too little disk).
    """
    problems = source.problems(formats=False)  # the files are read below, .bin too
    base_dir = Path(source.base_model or "")
    if args.output_type not in ("huggingface", "pth"):
        problems.append(f"--output_type {args.output_type!r}: choose huggingface or pth")
    has_base = bool(source.base_model) and base_dir.is_dir()  # else a problem already
    try:
        config = check_model_folder(base_dir, "--base_model") if has_base else None
        files = weight_files(base_dir, BASE_WEIGHTS) if has_base else None
    except YakError as e:
        problems.append(str(e))
        config = files = None
    lora_dirs = [Path(p) for p in source.adapters]
    if not lora_dirs:
        problems.append("--adapters: give at least one adapter or stage-1 folder")
    steps = [s for s in (_load_step(p, problems) for p in lora_dirs) if s is not None]
    if config is not None and len(steps) == len(lora_dirs):
        misfits, warnings = adapter_base_problems(base_dir, lora_dirs)
        for w in warnings:
            logger.warning("%s", w)
        if misfits:  # the per-tensor checks below would only repeat them
            raise YakError("cannot merge:\n  - " + "\n  - ".join(problems + misfits))
    if config is not None and config.get("model_type") not in ("llama", None):
        problems.append(f"{base_dir / 'config.json'}: model_type {config.get('model_type')!r}; only Llama "
                        "models are supported")
    if files is None or config is None:  # nothing more can be checked without the base
        raise YakError("cannot merge:\n  - " + "\n  - ".join(problems))

    base = _read_checkpoint(files, problems)
    if base is None:
        raise YakError("cannot merge:\n  - " + "\n  - ".join(problems))
    tied = bool(config.get("tie_word_embeddings", False))
    names = [k for k in base.shapes if not k.endswith("rotary_emb.inv_freq")]  # a buffer, not a weight
    if tied:
        names = [k for k in names if k != LM_HEAD_KEY]
    if EMBED_KEY not in base.shapes:
        raise YakError(f"--base_model {base_dir}: no {EMBED_KEY}; not a Llama causal LM checkpoint")
    shapes = {k: base.shapes[k] for k in names}
    ops: dict[str, list[_Op]] = {k: [] for k in names}
    starts = {k: k for k in names}  # output name -> base tensor it starts from
    lm_follows = tied
    for step in steps:
        touched = list(step.replacements) + [k for k in step.loras if k not in step.replacements]
        if lm_follows and step.ties_lm_head:  # peft's ensure_weight_tying: one matrix serves both layers,
            touched = [k for k in touched if k != LM_HEAD_KEY]  # stored twice; the embedding's copy is used
        elif lm_follows and (LM_HEAD_KEY in touched or EMBED_KEY in touched):
            # lm_head stops following the embedding here (peft trains a separate copy, or leaves the
            # original in place); it inherits the embedding's history so far.
            lm_follows = False
            ops[LM_HEAD_KEY], shapes[LM_HEAD_KEY], starts[LM_HEAD_KEY] = list(ops[EMBED_KEY]), shapes[EMBED_KEY], EMBED_KEY
            names.insert(names.index(EMBED_KEY) + 1, LM_HEAD_KEY)
        elif step.kind == "stage1" and not tied and step.ties_lm_head:
            problems.append(f"{step.path / 'yak_adapter.json'}: tie_word_embeddings is true but the base "
                            f"model's embeddings are untied; this stage-1 output was made for another base")
        for name in touched:
            if name not in shapes:
                problems.append(f"{step.path}: tensor {name} does not exist in the base model (found "
                                f"{len(shapes)} tensors such as {names[1]}); the adapter was made for "
                                "another base model")
                continue
            if name in step.replacements:
                new = step.weights.shapes[step.replacements[name]]
                resizable = name in (EMBED_KEY, LM_HEAD_KEY) and len(new) == 2 and new[1] == shapes[name][1]
                if new != shapes[name] and not resizable:
                    problems.append(f"{step.path}: {name} has shape {list(new)}, the base model's "
                                    f"{list(shapes[name])}; the adapter was made for another base model")
                    continue
                shapes[name] = new
                ops[name].append(_Op(step, "replace"))
            if name in step.loras:
                d = _delta_shape(step, name)
                if d != shapes[name]:
                    hint = ("the vocabulary was resized but no stage-1 output or modules_to_save supplies "
                            "the resized embedding" if name in (EMBED_KEY, LM_HEAD_KEY)
                            else "the adapter was made for another base model")
                    problems.append(f"{step.path}: LoRA update of {name} has shape {list(d)}, the weight "
                                    f"{list(shapes[name])}; {hint}")
                    continue
                ops[name].append(_Op(step, "lora"))
    vocab = shapes[EMBED_KEY][0]
    if not lm_follows and shapes[LM_HEAD_KEY][0] != vocab:
        problems.append(f"lm_head keeps {shapes[LM_HEAD_KEY][0]} rows while the embedding has {vocab}: the "
                        "adapters must carry lm_head too (modules_to_save) or keep it tied")

    tok_dir = Path(source.tokenizer_dir())
    n_tok = _tokenizer_length(tok_dir, problems)
    base_vocab = config.get("vocab_size", base.shapes[EMBED_KEY][0])
    if n_tok is not None:
        if n_tok > vocab:
            problems.append(f"tokenizer {tok_dir} has {n_tok} tokens but the merged embeddings have {vocab} "
                            "rows: tokens without embeddings. Give the adapter's own tokenizer "
                            "(--tokenizer_path) or the adapter that carries the resized embeddings")
        elif vocab != base_vocab and vocab != padded_vocab_size(n_tok):
            problems.append(f"tokenizer {tok_dir} has {n_tok} tokens (padded to {padded_vocab_size(n_tok)}) but the "
                            f"merged embeddings have {vocab} rows; the adapters were trained with another "
                            "tokenizer: pass it with --tokenizer_path")

    if source.dtype == "auto":
        dtype = DTYPES.get(str(config.get("torch_dtype") or config.get("dtype") or ""),
                           base.dtypes[EMBED_KEY] if base.dtypes[EMBED_KEY] in SAFETENSORS_DTYPES else torch.float32)
    else:
        dtype = DTYPES.get(source.dtype, torch.float16)
    out = Path(args.output_dir).resolve()
    for p in inputs_inside(out, [base_dir, *lora_dirs, tok_dir]):
        problems.append(f"--output_dir {args.output_dir} is (or contains) the input folder {p}; "
                        "choose a new folder")
    problems += output_dir_problems(args.output_dir, args.overwrite)
    if args.output_type == "pth":
        _check_pth(config, shapes, args, problems)
    group = {k: base.file_of[starts[k]] for k in names}
    order = sorted(names, key=lambda k: files.index(group[k]))  # stable: keeps each file's order
    plan = _Plan(base, steps, {k: ops[k] for k in order}, starts, shapes, order, group, vocab,
                 lm_follows, config, dtype, tok_dir, base_dir,
                 _parse_size(args.max_shard_size) if args.output_type == "huggingface" else 0)
    needed = _output_bytes(plan) * (2 if args.output_type == "pth" else 1) + (16 << 20)
    anchor = next(p for p in [out, *out.parents] if p.exists())
    free = shutil.disk_usage(anchor).free
    if free < needed:
        problems.append(f"--output_dir {out}: needs about {needed / 2**30:.2f} GiB but {anchor} has only "
                        f"{free / 2**30:.2f} GiB free; free some space or write elsewhere")
    if problems:
        raise YakError("cannot merge:\n  - " + "\n  - ".join(problems))
    return plan


def _tokenizer_length(folder: Path, problems: list[str]) -> int | None:
    from yak.tokenizer import load_tokenizer

    try:
        return len(load_tokenizer(folder))
    except YakError as e:
        problems.append(f"{e}; or pass --tokenizer_path")
        return None


def _output_bytes(plan: _Plan) -> int:
    size = plan.dtype.itemsize
    return sum(math.prod(plan.shapes[k]) * size for k in plan.order)


# ----------------------------------------------------------------------------------------------- computing


class _Inputs:
    """The open adapter files (kept open: they are small next to the base) and one open base file."""

    def __init__(self, plan: _Plan, stack: ExitStack):
        self.plan = plan
        self.steps: dict[Path, dict[Path, WeightHandle]] = {
            s.path: {f: stack.enter_context(open_weights(f)) for f in s.weights.files} for s in plan.steps}

    def adapter_tensor(self, step: _Step, key: str) -> torch.Tensor:
        return self.steps[step.path][step.weights.file_of[key]].get(key)

    def compute(self, name: str, base: WeightHandle) -> torch.Tensor:
        """The merged tensor ``name`` in the output dtype (float32 arithmetic)."""
        ops = self.plan.ops[name]
        last = max((i for i, op in enumerate(ops) if op.kind == "replace"), default=None)
        if last is None:
            w = base.get(self.plan.source[name])
        else:  # the base (or an earlier replacement) would be overwritten: never read it
            step = ops[last].step
            w = self.adapter_tensor(step, step.replacements[name])
        loras = ops[(last + 1) if last is not None else 0:]
        if loras:  # float32 copy: updated in place below, and inputs may be shared or mapped
            w = w.to(torch.float32, copy=True)
        for op in loras:
            a_key, b_key, scale, emb = op.step.loras[name]
            a = self.adapter_tensor(op.step, a_key).to(torch.float32)  # (r, in)
            b = self.adapter_tensor(op.step, b_key).to(torch.float32)  # (out, r)
            if emb:
                w.addmm_(a.T, b.T, alpha=scale)  # peft's embedding delta is (B @ A).T
            else:
                w.addmm_(b, a, alpha=scale)
        out = w.to(self.plan.dtype) if w.is_floating_point() else w
        if out.is_floating_point() and not torch.isfinite(out).all():
            raise YakError(f"merged tensor {name} has NaN or inf values in {self.plan.dtype} (from "
                           f"{[str(op.step.path) for op in ops] or 'the base model'}); nothing was written. "
                           "Check the adapters, or try --dtype bfloat16/float32")
        return out


def _iter_merged(plan: _Plan) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every output tensor in order, one base file open at a time."""
    with ExitStack() as stack:
        inputs = _Inputs(plan, stack)
        bar = tqdm(total=len(plan.order), desc="merge", unit="tensor")
        for f in plan.base.files:
            names = [k for k in plan.order if plan.group[k] == f]
            if not names:
                continue
            with open_weights(f) as base:
                for name in names:
                    logger.debug("%s %s %s from %s", name, tuple(plan.shapes[name]),
                                 str(plan.dtype).removeprefix("torch."), f.name)
                    yield name, inputs.compute(name, base)
                    bar.update()
        bar.close()


# ----------------------------------------------------------------------------------------------- writing


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


def _shard_specs(plan: _Plan, max_bytes: int) -> list[list[tuple[str, tuple[int, ...], torch.dtype]]]:
    shards, size = [[]], 0
    for name in plan.order:
        n = math.prod(plan.shapes[name]) * plan.dtype.itemsize
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, plan.shapes[name], plan.dtype))
        size += n
    return shards


def _write_huggingface(plan: _Plan, out: Path) -> list[str]:
    shards = _shard_specs(plan, plan.shard_bytes)
    n = len(shards)
    file_names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                                                       for i in range(n)]
    weight_map = {}
    merged = _iter_merged(plan)
    for specs, fname in zip(shards, file_names):
        writer = StreamingSafetensorsWriter(out / fname, specs)
        for spec in specs:
            name, tensor = next(merged)
            writer.write(name, tensor)
            weight_map[name] = fname
        writer.close()
    if n > 1:
        atomic_write_json(out / "model.safetensors.index.json",
                          {"metadata": {"total_size": _output_bytes(plan)}, "weight_map": weight_map})
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


def _check_pth(config: dict, shapes: dict, args: MergeArguments, problems: list[str]) -> None:
    if config.get("attention_bias") or config.get("mlp_bias"):
        problems.append("--output_type pth: Meta's layout has no biases, but the base model has some")
    if args.num_shards is not None and args.num_shards < 1:
        problems.append(f"--num_shards must be at least 1, got {args.num_shards}")
        return
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    mp = args.num_shards or META_SHARDS_BY_HIDDEN.get(hidden, 1)
    vocab = shapes[EMBED_KEY][0]
    for what, n in [("hidden_size", hidden), ("num_key_value_heads", kv), ("intermediate_size",
                    config["intermediate_size"]), ("vocab_size", vocab)]:
        if n % mp:
            problems.append(f"--output_type pth: {what} {n} is not divisible by {mp} shards; choose "
                            "--num_shards accordingly")
    unknown = [k for k in shapes if k not in META_TOP_NAMES and _meta_layer_name(k) is None]
    if unknown:
        problems.append(f"--output_type pth: tensors without a Meta name: {unknown[:5]}")


def _meta_layer_name(name: str) -> tuple[str, int | None] | None:
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    if not m or m[2] not in META_LAYER_NAMES:
        return None
    meta, dim = META_LAYER_NAMES[m[2]]
    return f"layers.{m[1]}.{meta}", dim


def meta_name(name: str) -> tuple[str, int | None]:
    """Meta's name for a Hugging Face Llama tensor, and the dimension Meta splits it along."""
    return META_TOP_NAMES.get(name) or _meta_layer_name(name)


def unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo the rotary permutation that transformers' Llama conversion applies to q/k projections.

    Meta's checkpoints rotate interleaved pairs (x0, x1), (x2, x3), ...; the Hugging Face layout rotates
    the two halves of each head. ``permute`` there is ``view(heads, d/heads/2, 2, in).transpose(1, 2)``.
    """
    out, inp = w.shape  # (heads * head_dim, hidden)
    return w.view(n_heads, 2, out // n_heads // 2, inp).transpose(1, 2).reshape(out, inp)


def meta_params(config: dict, vocab_size: int) -> dict:
    """Meta's ``params.json`` for a Llama config; ``multiple_of``/``ffn_dim_multiplier`` reproduce its FFN."""
    dim, ffn = config["hidden_size"], config["intermediate_size"]
    base = int(2 * 4 * dim / 3)

    def meta_ffn(multiple_of: int, mult: float | None) -> int:  # Meta's FeedForward sizing
        h = int(mult * base) if mult is not None else base
        return multiple_of * ((h + multiple_of - 1) // multiple_of)

    candidates = [(2**k, None) for k in range(12, -1, -1)] + [(2**k, ffn / base) for k in range(12, -1, -1)]
    multiple_of, mult = next(((m, f) for m, f in candidates if meta_ffn(m, f) == ffn), (1, (ffn + 0.5) / base))
    params = {"dim": dim, "n_layers": config["num_hidden_layers"], "n_heads": config["num_attention_heads"],
              "n_kv_heads": config.get("num_key_value_heads") or config["num_attention_heads"],
              "vocab_size": vocab_size, "multiple_of": multiple_of, "norm_eps": config["rms_norm_eps"],
              "rope_theta": config.get("rope_theta", 10000.0)}
    if mult is not None:
        params["ffn_dim_multiplier"] = mult
    return params


def _write_pth(plan: _Plan, out: Path, num_shards: int | None) -> list[str]:
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
    for name, tensor in _iter_merged(plan):
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


# ----------------------------------------------------------------------------------------------- entry point


def merge(source: ModelSource, args: MergeArguments) -> Path:
    """Merge ``source.adapters`` (in order) into ``source.base_model`` and write ``args.output_dir``.

    Args:
        source: the base model, the adapters applied in order, the tokenizer copied into the output, and the
            output dtype (see :class:`ModelSource`).
        args: the merge options (see :class:`MergeArguments`).

    Returns:
        The output folder.
    """
    start = time.time()
    plan = plan_merge(source, args)
    logger.info("merging %s into %s -> %s (%s, %s)", [str(s.path) for s in plan.steps], source.base_model,
                args.output_dir, args.output_type, plan.dtype)
    with replace_dir(args.output_dir, overwrite=args.overwrite) as tmp:
        if args.output_type == "pth":
            files = _write_pth(plan, tmp, args.num_shards)
        else:
            files = _write_huggingface(plan, tmp)
        for name in TOKENIZER_FILES:
            if (plan.tokenizer_dir / name).is_file():
                shutil.copy2(plan.tokenizer_dir / name, tmp / name)
        # what is merged in (also what the base had), so that nobody applies it a second time on top
        # and the base it all applies to, for the adapter <-> base check of what is later applied on top
        atomic_write_json(tmp / MERGE_FILE, {"base_model": str(plan.base_dir.resolve()), "adapters": [
            *merged_adapters(plan.base_dir), *(str(s.path.resolve()) for s in plan.steps)],
            "base_record": base_record(plan.base_dir)})
    rows = [
        ("inputs applied", " -> ".join([plan.base_dir.name] + [s.path.name for s in plan.steps])),
        ("tensors", str(len(plan.order))),
        ("parameters", f"{sum(math.prod(plan.shapes[k]) for k in plan.order):,}"),
        ("vocab_size", str(plan.vocab_size)),
        ("tied embeddings", str(plan.tied)),
        ("dtype", str(plan.dtype).removeprefix("torch.")),
        ("files", f"{len(files)} ({files[0]}{' ...' if len(files) > 1 else ''})"),
        ("size", f"{_output_bytes(plan) / 2**30:.3f} GiB"),
        ("time", f"{time.time() - start:.1f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    logger.info("merge summary\n%s", "\n".join(f"  {k:<{width}}  {v}" for k, v in rows))
    return Path(args.output_dir)
