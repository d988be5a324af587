"""Read and check every input of the merge, and plan each output tensor (names and shapes only: no tensor
data is read until the plan holds)."""

from __future__ import annotations

import logging
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from yak import YakError
from yak.formats import (
    ADAPTER_WEIGHTS,
    BASE_WEIGHTS,
    DTYPES,
    EMBED_KEY,
    EMBEDDINGS_FILES,
    LM_HEAD_KEY,
    PEFT_PREFIX,
    SAFETENSORS_DTYPES,
    YAK_ADAPTER_FILE,
    WeightIndex,
    adapter_base_problems,
    check_model_folder,
    padded_vocab_size,
    read_stage1,
    weight_files,
    weights_in,
)
from yak.io import read_json
from yak.merge.meta import check_pth
from yak.outdir import inputs_inside, output_dir_problems
from yak.source import ModelSource

logger = logging.getLogger(__package__)  # "yak.merge", the name the --verbose lines have always shown


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
class Step:
    """One input folder applied on top of the base: full replacements, then LoRA deltas."""

    path: Path
    kind: str  # "stage1" or "lora"
    weights: WeightIndex
    replacements: dict[str, str] = field(default_factory=dict)  # base name -> key in weights
    loras: dict[str, tuple[str, str, float, bool]] = field(default_factory=dict)  # name -> (A, B, scale, emb)
    ties_lm_head: bool = False  # when given the embedding only, lm_head keeps following it


@dataclass
class Op:
    step: Step
    kind: str  # "replace" or "lora"


@dataclass
class Plan:
    base: WeightIndex
    steps: list[Step]
    ops: dict[str, list[Op]]  # output name -> ops, in order
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


def _load_step(path: Path, problems: list[str]) -> Step | None:
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
        return Step(path, "stage1", w, replacements={k: k for k in w.shapes},
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
    step = Step(path, "lora", w, ties_lm_head=bool(cfg.get("ensure_weight_tying", False)))
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


def _delta_shape(step: Step, name: str) -> tuple[int, ...]:
    a, b, _, emb = step.loras[name]
    out = (step.weights.shapes[b][0], step.weights.shapes[a][1])
    return out[::-1] if emb else out  # peft's embedding LoRA stores the transposed factors


def _parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)B?\s*", text.upper())
    if not m:
        raise YakError(f"--max_shard_size {text!r}: expected a size such as 2GB or 500MB")
    return int(float(m[1]) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m[2]])


def plan_merge(source: ModelSource, args: MergeArguments) -> Plan:
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
    ops: dict[str, list[Op]] = {k: [] for k in names}
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
                ops[name].append(Op(step, "replace"))
            if name in step.loras:
                d = _delta_shape(step, name)
                if d != shapes[name]:
                    hint = ("the vocabulary was resized but no stage-1 output or modules_to_save supplies "
                            "the resized embedding" if name in (EMBED_KEY, LM_HEAD_KEY)
                            else "the adapter was made for another base model")
                    problems.append(f"{step.path}: LoRA update of {name} has shape {list(d)}, the weight "
                                    f"{list(shapes[name])}; {hint}")
                    continue
                ops[name].append(Op(step, "lora"))
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
        check_pth(config, shapes, args.num_shards, problems)
    group = {k: base.file_of[starts[k]] for k in names}
    order = sorted(names, key=lambda k: files.index(group[k]))  # stable: keeps each file's order
    plan = Plan(base, steps, {k: ops[k] for k in order}, starts, shapes, order, group, vocab,
                 lm_follows, config, dtype, tok_dir, base_dir,
                 _parse_size(args.max_shard_size) if args.output_type == "huggingface" else 0)
    needed = output_bytes(plan) * (2 if args.output_type == "pth" else 1) + (16 << 20)
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


def output_bytes(plan: Plan) -> int:
    size = plan.dtype.itemsize
    return sum(math.prod(plan.shapes[k]) * size for k in plan.order)
