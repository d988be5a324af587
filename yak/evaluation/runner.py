"""Run tasks on models: check everything up front, load each model once, run every task, write the report."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field

import torch

from yak import YakError
from yak.evaluation import metrics
from yak.evaluation.report import write_report
from yak.evaluation.scoring import ModelSpec, Scorer, load_model
from yak.evaluation.tasks import (
    DEFAULT_DATA_ROOT,
    TaskConfig,
    build_examples,
    builtin_tasks,
    lm_files,
    load_task,
)
from yak.io import read_json
from yak.modeling import DTYPES
from yak.outdir import inputs_inside, output_dir_problems, replace_dir

logger = logging.getLogger(__name__)

DEFAULT_TASKS = ["heldout", "tncc", "tusa", "ti_mmlu", "ti_mmlu_5shot", "bo_en", "bo_zh", "tokenizer"]


@dataclass
class EvalArguments:
    """Options of ``evaluate.py``."""

    models: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Models to compare, each [NAME=]BASE[,ADAPTER...]: a Hugging Face or merged model "
            "folder, "
            "optionally with adapter folders applied in order (stage 1, CPT, SFT). Required."
        },
    )
    tasks: list[str] = field(
        default_factory=lambda: list(DEFAULT_TASKS),
        metadata={
            "help": "Shipped task names (see yak/evaluation/tasks/) or paths of your own task YAML files."
        },
    )
    output_dir: str = field(
        default="eval_out",
        metadata={
            "help": "Folder for results.json, results.md, results.png and predictions/ (written atomically)."
        },
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing output_dir."})
    data_root: str = field(
        default=DEFAULT_DATA_ROOT,
        metadata={"help": "Folder that {data_root} in task configs points to (the public evaluation sets)."},
    )
    batch_size: int = field(default=8, metadata={"help": "Sequences per forward pass."})
    max_length: int | None = field(
        default=None,
        metadata={
            "help": "Longest token sequence fed to a model; default "
            "its max_position_embeddings, at most 4096."
        },
    )
    limit: int | None = field(
        default=None,
        metadata={"help": "Evaluate a seeded sample of N examples of each record-based task (quick checks)."},
    )
    lm_max_bytes: int | None = field(
        default=None,
        metadata={
            "help": "Language modelling: score only the first N bytes (whole characters) of each file."
        },
    )
    num_fewshot: int | None = field(
        default=None, metadata={"help": "Override every record-based task's num_fewshot."}
    )
    max_new_tokens: int | None = field(
        default=None, metadata={"help": "Override every generation task's max_new_tokens."}
    )
    seed: int = field(default=1234, metadata={"help": "Seed of the few-shot draws."})
    dtype: str = field(
        default="auto",
        metadata={"help": "dtype of every model's weights: auto (the checkpoint's own), float32, bfloat16 or "
                  "float16 (as --dtype of the other scripts).", "choices": ["auto", *DTYPES]},
    )
    device: str = field(default="auto", metadata={"help": "auto (cuda if available), cpu, cuda, cuda:1, ..."})
    chat_template: bool = field(
        default=False,
        metadata={
            "help": "Wrap the prompts of record-based tasks in the "
            "tokenizer's chat template (instruction-tuned models)."
        },
    )


def prepare(args: EvalArguments) -> tuple[list[ModelSpec], list[TaskConfig]]:
    """Check every option, task config, data file and model folder; one YakError lists all problems."""
    problems = []
    if not args.models:
        problems.append("no model given: pass --models DIR [NAME=DIR,ADAPTER ...]")
    if args.batch_size < 1:
        problems.append(f"--batch_size must be >= 1, found {args.batch_size}")
    for opt in ("limit", "lm_max_bytes", "max_new_tokens"):
        if getattr(args, opt) is not None and getattr(args, opt) < 1:
            problems.append(f"--{opt} must be >= 1, found {getattr(args, opt)}")
    problems += output_dir_problems(args.output_dir, args.overwrite)
    if args.max_length is not None and args.max_length < 2:
        problems.append(f"--max_length must be >= 2, found {args.max_length}")
    if not args.tasks:
        problems.append(
            f"no task given: pass --tasks with some of {', '.join(builtin_tasks())} or YAML paths"
        )
    specs = []
    for text in args.models:
        try:
            spec = ModelSpec.parse(text, dtype=args.dtype)
        except YakError as e:
            problems.append(str(e))
            continue
        found = spec.problems()
        problems += found
        specs.append(spec)
        config = os.path.join(spec.source.base_model, "config.json")
        limit = read_json(config).get("max_position_embeddings") if not found else None  # checked by problems()
        if args.max_length and limit and args.max_length > limit:  # RoPE runs past it silently, untrained
            problems.append(f"--max_length {args.max_length} is over model {spec.name}'s context of {limit} "
                            "positions (max_position_embeddings); lower it or leave it out")
        # --overwrite would replace the folder by the report
        for path in inputs_inside(args.output_dir, [spec.source.base_model, *spec.source.adapters]):
            problems.append(f"output folder {args.output_dir} is (or contains) the model folder {path}")
    if len({s.name for s in specs}) != len(specs):
        problems.append(f"model names must differ, found {[s.name for s in specs]}; name them NAME=DIR")
    tasks = []
    for name in args.tasks:
        try:
            tasks.append(load_task(name, args.data_root, args.num_fewshot, args.max_new_tokens))
        except YakError as e:
            problems.append(str(e))
    if len({t.name for t in tasks}) != len(tasks):
        problems.append(f"task names must differ, found {[t.name for t in tasks]}")
    if problems:
        raise YakError("cannot evaluate:\n  - " + "\n  - ".join(problems))
    return specs, tasks


def evaluate(args: EvalArguments) -> dict:
    """Evaluate every model on every task and write the report to ``args.output_dir``.

    Returns:
        the results dictionary written to ``results.json``.
    """
    specs, tasks = prepare(args)
    logger.info("arguments: %s", asdict(args))
    # Build every task's examples before loading a model, so data problems surface first.
    examples = {
        t.name: build_examples(t, args.data_root, args.limit, args.seed)
        for t in tasks
        if t.kind not in ("language_modelling", "tokenizer")
    }
    logger.info("evaluating %s on %s", [s.name for s in specs], [t.name for t in tasks])
    results = {"models": [{"name": s.name, **asdict(s.source)} for s in specs], "tasks": {}, "results": {}, "arguments": asdict(args)}
    predictions: dict[str, dict[str, list[dict]]] = {}
    for t in tasks:
        results["tasks"][t.name] = {"kind": t.kind, "description": t.description, "config": t.path}
    # the folder is locked (and checked again) for the whole run, not only at its end: one run per folder
    with replace_dir(args.output_dir, overwrite=args.overwrite) as tmp:
        for spec in specs:
            model, tokenizer = load_model(spec, args.device)
            max_length = args.max_length or min(getattr(model.config, "max_position_embeddings", 2048), 4096)
            scorer = Scorer(model, tokenizer, max_length, args.batch_size, args.chat_template)
            results["results"][spec.name] = {}
            predictions[spec.name] = {}
            for t in tasks:
                start = time.perf_counter()
                logger.info("%s: %s (%s)", spec.name, t.name, t.kind)
                res, preds = run_task(scorer, t, examples.get(t.name), args)
                res["seconds"] = round(time.perf_counter() - start, 2)
                results["results"][spec.name][t.name] = res
                if preds:
                    predictions[spec.name][t.name] = preds
            del model, scorer
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        write_report(tmp, results, predictions)
    logger.info("wrote %s", args.output_dir)
    return results


def run_task(scorer: Scorer, cfg: TaskConfig, examples, args: EvalArguments) -> tuple[dict, list[dict]]:
    """Run one task with one model. Returns ``(metrics, per-example predictions)``."""
    if cfg.kind == "language_modelling":
        return _language_modelling(scorer, cfg, args), []
    if cfg.kind == "tokenizer":
        return _tokenizer_section(scorer.tokenizer, cfg, args), []
    exs, skipped = examples
    if cfg.kind == "generation":
        res, preds = _generation(scorer, cfg, exs)
    else:
        res, preds = _choice(scorer, cfg, exs)
    res["skipped"] = skipped
    return res, preds


def _read_text(path: str, max_bytes: int | None) -> str:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if max_bytes is not None:
        text = text.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")  # drop a cut character
    return text


def _language_modelling(scorer: Scorer, cfg: TaskConfig, args: EvalArguments) -> dict:
    stride = min(cfg.stride or scorer.max_length // 2, scorer.max_length - 1)
    files = lm_files(cfg, args.data_root)
    texts = [_read_text(p, args.lm_max_bytes) for p in files]
    res = {}
    for path, text, (nll, n_tokens) in zip(files, texts, scorer.rolling_nll(texts, stride, desc=cfg.name)):
        stem = os.path.splitext(os.path.basename(path))[0]
        n_bytes = len(text.encode("utf-8"))
        res[f"{stem}/bits_per_byte"] = metrics.bits_per_unit(nll, n_bytes)
        res[f"{stem}/bits_per_char"] = metrics.bits_per_unit(nll, len(text))
        res[f"{stem}/tokens_per_byte"] = n_tokens / n_bytes
    res["stride"], res["max_length"] = stride, scorer.max_length
    return res


def _choice(scorer: Scorer, cfg: TaskConfig, examples) -> tuple[dict, list[dict]]:
    """Classification and multiple choice: the highest-likelihood continuation is the prediction."""
    pairs = [(ex.prompt, c) for ex in examples for c in ex.continuations]
    scores, truncated = scorer.loglikelihoods(pairs, desc=cfg.name)
    preds, preds_norm, rows, k, n_cut = [], [], [], 0, 0
    for ex in examples:
        s = scores[k : k + len(ex.continuations)]
        n_cut += any(truncated[k : k + len(ex.continuations)])
        k += len(ex.continuations)
        per_byte = [v / max(1, len(c.encode("utf-8"))) for v, c in zip(s, ex.continuations)]
        preds.append(max(range(len(s)), key=s.__getitem__))
        preds_norm.append(max(range(len(s)), key=per_byte.__getitem__))
        rows.append({"gold": ex.gold, "pred": preds[-1], "pred_norm": preds_norm[-1], "loglikelihoods": s})
    golds = [ex.gold for ex in examples]
    res = {"accuracy": 100 * metrics.accuracy(preds, golds)}
    if not (cfg.kind == "multiple_choice" and cfg.scoring == "letter"):  # letters all have one byte
        res["accuracy_norm"] = 100 * metrics.accuracy(preds_norm, golds)
    res.update(n=len(examples), truncated=n_cut, chance=100 / len(examples[0].continuations))
    return res, rows


def _generation(scorer: Scorer, cfg: TaskConfig, examples) -> tuple[dict, list[dict]]:
    outputs, truncated = scorer.generate(
        [ex.prompt for ex in examples], cfg.max_new_tokens, cfg.stop, desc=cfg.name
    )
    refs = [ex.reference for ex in examples]
    res = {}
    for m in cfg.metrics:
        if m == "chrf++":
            res[m] = metrics.chrf_pp(outputs, refs)
        elif m == "bleu":
            res[m] = metrics.bleu(outputs, refs, cfg.bleu_tokenize)
        elif m == "exact_match":
            res[m] = 100 * sum(map(metrics.exact_match, outputs, refs)) / len(refs)
        elif m == "f1":
            res[m] = 100 * sum(map(metrics.f1_syllables, outputs, refs)) / len(refs)
    res.update(n=len(examples), truncated=truncated)
    return res, [{"prediction": o, "reference": r} for o, r in zip(outputs, refs)]


def _tokenizer_section(tokenizer, cfg: TaskConfig, args: EvalArguments) -> dict:
    """Tokens per syllable and length reduction against Llama 2 (``yak.tokenizer.tokenizer_stats``)."""
    from yak.tokenizer import load_tokenizer, tokenizer_stats

    baseline = load_tokenizer(next(p for p in cfg.baseline_tokenizer if os.path.exists(p)))
    res = {}
    for path in lm_files(cfg, args.data_root):
        lines = [line for line in _read_text(path, args.lm_max_bytes).split("\n") if line.strip()]
        stem = os.path.splitext(os.path.basename(path))[0]
        for key, value in tokenizer_stats(tokenizer, lines, reference=baseline).items():
            res[f"{stem}/{key}"] = value
    return res
