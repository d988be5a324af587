"""Task configs: small YAML files that say where a benchmark's data is, its format, prompt, metric and shots.

Adding a benchmark is data, not code: write a YAML file of one of the five kinds below (or copy a shipped one
from ``yak/evaluation/tasks/``) and pass its path to ``evaluate.py --tasks``. Every config is checked
strictly (unknown keys, missing data files, records missing fields) before any model is loaded.

Kinds and their keys (``name``, ``kind`` and ``description`` are common to all):

- ``language_modelling``: ``files`` (glob(s) of UTF-8 text files; each file is one document), ``stride``
  (tokens between sliding windows; default half the window).
- ``classification``: ``test``, ``fewshot`` (JSONL files), ``prompt`` (``str.format`` template over a
  record's fields), ``label_field``, ``choices`` (label -> verbaliser the model scores, or a list),
  ``target`` (continuation template with ``{choice}``), ``num_fewshot``, ``normalize``.
- ``multiple_choice``: as classification, plus ``question_field``, ``choices_field`` (a list in each record)
  or ``options_in_question`` (options embedded as ``A ...`` lines), ``answer_field`` (letter or index),
  ``letters``, ``scoring`` (``letter`` or ``option``).
- ``generation``: ``prompt``, ``reference_field``, ``metrics`` (``chrf++``, ``bleu``, ``exact_match``,
  ``f1``), ``bleu_tokenize``, ``max_new_tokens``, ``stop``.
- ``tokenizer``: ``files`` (Tibetan text), ``baseline_tokenizer`` (paths tried in order).

Paths may contain ``{data_root}`` (``--data_root``, default ``../shared/data/eval``); relative paths are
relative to the current folder (the repository root when you run ``evaluate.py`` from there).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
import random
import re
import string
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from yak import YakError

logger = logging.getLogger(__name__)

BUILTIN_DIR = Path(__file__).resolve().parent / "tasks"
DEFAULT_DATA_ROOT = "../shared/data/eval"

TSHEG = "\u0f0b"
# A space between two Tibetan syllables (letters, subjoined letters and vowel signs: U+0F40-U+0FBC) was a
# tsheg before the text was syllable-segmented; spaces next to punctuation (shad, head marks) were spaces.
_SEGMENTED_SPACE = re.compile(r"(?<=[\u0f40-\u0fbc]) +(?=[\u0f40-\u0fbc])")


def rejoin_tsheg(text: str) -> str:
    """Turn syllable-segmented Tibetan (``བྲག ཡེར པ``) into running text (``བྲག་ཡེར་པ``).

    TNCC-style data drops the tsheg and separates syllables by spaces; models are trained on text with the
    tsheg, so scoring the segmented form measures the segmentation more than the model.
    """
    return _SEGMENTED_SPACE.sub(TSHEG, text)


NORMALIZERS = {"none": lambda s: s, "rejoin_tsheg": rejoin_tsheg}
_TYPE_NAMES = {str: "a string", int: "an integer", bool: "true or false", int | None: "an integer",
               list[str]: "a list of strings", dict[str, str]: "a mapping of strings",
               dict[str, str] | list[str]: "a mapping label: text, or a list of labels"}
KINDS = ("language_modelling", "classification", "multiple_choice", "generation", "tokenizer")
GENERATION_METRICS = ("chrf++", "bleu", "exact_match", "f1")


@dataclass
class TaskConfig:
    """One task, as read from its YAML file (see the module docstring for the keys of each kind)."""

    name: str
    kind: str
    description: str = ""
    # language_modelling / tokenizer
    files: list[str] = field(default_factory=list)
    stride: int | None = None
    baseline_tokenizer: list[str] = field(default_factory=list)
    # record-based kinds
    test: str = ""
    fewshot: str = ""
    num_fewshot: int = 0
    fewshot_separator: str = "\n\n"
    prompt: str = ""
    target: str = " {choice}"
    normalize: dict[str, str] = field(default_factory=dict)
    # classification
    label_field: str = "label"
    choices: dict[str, str] | list[str] = field(default_factory=dict)
    # multiple_choice
    question_field: str = "question"
    choices_field: str = ""
    options_in_question: bool = False
    answer_field: str = "answer"
    letters: list[str] = field(default_factory=lambda: ["A", "B", "C", "D"])
    scoring: str = "letter"
    # generation
    reference_field: str = ""
    metrics: list[str] = field(default_factory=list)
    bleu_tokenize: str = "13a"
    max_new_tokens: int = 64
    stop: list[str] = field(default_factory=lambda: ["\n"])
    # where the config came from (not a YAML key)
    path: str = ""


@dataclass
class Example:
    """One scored item: the formatted ``prompt``, the continuations to score or the reference to match."""

    prompt: str
    continuations: list[str] = field(default_factory=list)
    gold: int = -1
    reference: str = ""
    record: dict[str, Any] = field(default_factory=dict)


def builtin_tasks() -> dict[str, Path]:
    """Names of the shipped task configs (``yak/evaluation/tasks/*.yaml``) and their paths."""
    return {p.stem: p for p in sorted(BUILTIN_DIR.glob("*.yaml"))}


def _fields(template: str) -> list[str]:
    return [f for _, f, _, _ in string.Formatter().parse(template) if f]


def _resolve(path: str, data_root: str) -> str:
    return os.path.expanduser(path.replace("{data_root}", data_root))


def load_task(name_or_path: str, data_root: str = DEFAULT_DATA_ROOT, num_fewshot: int | None = None,
              max_new_tokens: int | None = None) -> TaskConfig:
    """Read and check one task config: a shipped name (``tncc``) or a path to a YAML file.

    Args:
        name_or_path: a shipped task name or a YAML path.
        data_root: what ``{data_root}`` in its paths stands for.
        num_fewshot: replaces a record-based task's ``num_fewshot`` (then its few-shot file is checked too).
        max_new_tokens: replaces a generation task's ``max_new_tokens``.

    Raises:
        YakError: listing every problem found (unknown task, unknown keys, bad values, missing files).
    """
    builtin = builtin_tasks()
    if name_or_path in builtin:
        path = builtin[name_or_path]
    elif name_or_path.endswith((".yaml", ".yml")) and os.path.isfile(name_or_path):
        path = Path(name_or_path)
    else:
        raise YakError(
            f"unknown task {name_or_path!r}: not a shipped task ({', '.join(builtin)}) nor an existing "
            "YAML file; pass a shipped name or the path of your own task config"
        )
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise YakError(f"task config {path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise YakError(f"task config {path}: expected a mapping of keys, found {type(raw).__name__}")
    known = {f.name for f in dataclasses.fields(TaskConfig)} - {"path"}
    problems = [f"unknown key {k!r}" for k in raw if k not in known]
    for key in ("files", "baseline_tokenizer"):
        if isinstance(raw.get(key), str):
            raw[key] = [raw[key]]
    if isinstance(raw.get("choices"), (dict, list)):  # YAML reads labels such as 0 or yes as numbers/booleans
        c = raw["choices"]
        raw["choices"] = {str(k): str(v) for k, v in c.items()} if isinstance(c, dict) else [str(v) for v in c]
    raw.setdefault("name", path.stem)
    if "kind" not in raw:
        problems.append(f"missing key 'kind' (one of {', '.join(KINDS)})")
    problems += _type_problems({k: v for k, v in raw.items() if k in known})
    if isinstance(raw["name"], str) and not re.fullmatch(r"[\w.+-]+", raw["name"]):  # as model names
        problems.append(f"name {raw['name']!r}: use letters, digits, '.', '_', '+', '-' (it names the "
                        "predictions file and the chart's panels)")
    if problems:
        raise YakError(f"task config {path}: " + "; ".join(problems))
    cfg = TaskConfig(**raw, path=str(path))
    if num_fewshot is not None and cfg.kind in ("classification", "multiple_choice", "generation"):
        cfg.num_fewshot = num_fewshot
    if max_new_tokens is not None and cfg.kind == "generation":
        cfg.max_new_tokens = max_new_tokens
    problems = _check(cfg, data_root)
    if problems:
        raise YakError(f"task {cfg.name} ({path}): " + "; ".join(problems))
    return cfg


def _matches(value: Any, hint: Any) -> bool:
    """Whether a YAML value fits a TaskConfig field type (``int`` excludes ``bool``)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is list:
        return isinstance(value, list) and all(_matches(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items())
    if hint is type(None):
        return value is None
    return isinstance(value, hint) and not (hint is int and isinstance(value, bool))


def _type_problems(raw: dict) -> list[str]:
    """Keys whose values have the wrong type, and templates that ``str.format`` cannot fill by field name."""
    hints = typing.get_type_hints(TaskConfig)
    problems = [f"{k!r} must be {_TYPE_NAMES.get(hints[k], hints[k])}, found {v!r}"
                for k, v in raw.items() if not _matches(v, hints[k])]
    for key in ("prompt", "target"):
        template = raw.get(key)
        if not isinstance(template, str):
            continue
        try:
            names = _fields(template)
        except ValueError as e:
            problems.append(f"{key} {template!r} is not a valid template ({e}; write a literal brace as {{{{ }}}})")
            continue
        if any(not n or n.isdigit() for n in names):
            problems.append(f"{key} {template!r}: name the fields, e.g. {{text}} ({{}} and {{0}} have no name)")
        elif key == "target" and set(names) != {"choice"}:
            problems.append(f"target {template!r} must contain {{choice}} and no other field")
    return problems


def _check(cfg: TaskConfig, data_root: str) -> list[str]:
    """Every problem of a config's values and files (empty list if none)."""
    problems = []
    if cfg.kind not in KINDS:
        return [f"kind {cfg.kind!r} is not one of {', '.join(KINDS)}"]
    if cfg.kind in ("language_modelling", "tokenizer"):
        if not cfg.files:
            problems.append("'files' is empty")
        for pattern in cfg.files:
            if not glob.glob(_resolve(pattern, data_root)):
                problems.append(f"no file matches {_resolve(pattern, data_root)!r} (check --data_root)")
        if cfg.stride is not None and cfg.stride < 1:
            problems.append(f"stride must be >= 1, found {cfg.stride}")
        if cfg.kind == "tokenizer":
            if not any(os.path.exists(p) for p in cfg.baseline_tokenizer):
                problems.append(f"none of the baseline tokenizers {cfg.baseline_tokenizer} exists")
            try:
                from yak.tokenizer import tokenizer_stats  # noqa: F401  (engineer T's statistics)
            except ImportError:
                problems.append(
                    "the tokenizer section needs yak.tokenizer.tokenizer_stats, not in this installation"
                )
        return problems
    for key in ("test",) + (("fewshot",) if cfg.num_fewshot > 0 and cfg.fewshot else ()):
        p = _resolve(getattr(cfg, key), data_root)
        if not p:
            problems.append(f"'{key}' is empty")
        elif not os.path.isfile(p):
            problems.append(
                f"{key} data file {p} does not exist (set --data_root to the folder holding the public "
                "sets; see docs/evaluation.md for where to get them)"
            )
    if cfg.num_fewshot < 0:
        problems.append(f"num_fewshot must be >= 0, found {cfg.num_fewshot}")
    if not cfg.prompt:
        problems.append("'prompt' is empty")
    for fld, how in cfg.normalize.items():
        if how not in NORMALIZERS:
            problems.append(f"normalize.{fld}: {how!r} is not one of {', '.join(NORMALIZERS)}")
    if cfg.kind == "classification" and not cfg.choices:
        problems.append("'choices' is empty")
    if cfg.kind == "multiple_choice":
        if cfg.scoring not in ("letter", "option"):
            problems.append(f"scoring must be 'letter' or 'option', found {cfg.scoring!r}")
        if not cfg.choices_field and not cfg.options_in_question:
            problems.append("set 'choices_field' (a list in each record) or 'options_in_question: true'")
        if "{options}" not in cfg.prompt and cfg.scoring == "letter":
            problems.append("letter scoring needs '{options}' in the prompt")
    if cfg.kind == "generation":
        if not cfg.reference_field:
            problems.append("'reference_field' is empty")
        bad = [m for m in cfg.metrics if m not in GENERATION_METRICS]
        if not cfg.metrics or bad:
            problems.append(
                f"metrics must be a non-empty list of {', '.join(GENERATION_METRICS)}, found {cfg.metrics}"
            )
        if cfg.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be >= 1, found {cfg.max_new_tokens}")
        import sacrebleu

        if "bleu" in cfg.metrics and cfg.bleu_tokenize not in sacrebleu.BLEU.TOKENIZERS:  # else a KeyError at the end
            problems.append(f"bleu_tokenize {cfg.bleu_tokenize!r} is not one of sacrebleu's "
                            f"{', '.join(sacrebleu.BLEU.TOKENIZERS)}")
    if problems:
        return problems
    for key in ("test",) + (("fewshot",) if cfg.num_fewshot > 0 and cfg.fewshot else ()):
        problems += _check_records(cfg, _resolve(getattr(cfg, key), data_root))
    return problems


def read_jsonl(path: str) -> list[dict]:
    """Records of a JSON-lines file (blank lines skipped); a line that is not a JSON object is an error."""
    records = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise YakError(f"{path}, line {i}: not valid JSON ({e})") from e
            if not isinstance(rec, dict):
                raise YakError(f"{path}, line {i}: expected a JSON object, found {type(rec).__name__}")
            records.append(rec)
    if not records:
        raise YakError(f"{path}: no records")
    return records


def _required_fields(cfg: TaskConfig) -> set[str]:
    if cfg.kind == "classification":
        return set(_fields(cfg.prompt)) | {cfg.label_field}
    if cfg.kind == "multiple_choice":
        need = (set(_fields(cfg.prompt)) - {"question", "options"}) | {cfg.question_field, cfg.answer_field}
        return need | ({cfg.choices_field} if cfg.choices_field else set())
    return set(_fields(cfg.prompt)) | {cfg.reference_field}


def _check_records(cfg: TaskConfig, path: str) -> list[str]:
    try:
        records = read_jsonl(path)
    except YakError as e:
        return [str(e)]
    need = _required_fields(cfg)
    problems = []
    for i, rec in enumerate(records, 1):
        missing = sorted(need - rec.keys())
        if missing:
            problems.append(
                f"{path}: record {i} lacks field(s) {', '.join(missing)} (has {', '.join(sorted(rec))})"
            )
        elif cfg.kind == "classification" and str(rec[cfg.label_field]) not in _verbalizers(cfg):
            problems.append(f"{path}: record {i} has label {rec[cfg.label_field]!r}, not among 'choices'")
        if len(problems) >= 5:
            problems.append("(further records not checked)")
            break
    return problems


def _verbalizers(cfg: TaskConfig) -> dict[str, str]:
    return dict(cfg.choices) if isinstance(cfg.choices, dict) else {str(c): str(c) for c in cfg.choices}


_OPTION_LINE = re.compile(r"^\s*([A-Z])[\s.．:：、)]\s*(.*?)\s*$")


def split_options(text: str, letters: list[str]) -> tuple[str, list[str]] | None:
    """Split ``question\\nA ...\\nB ...`` into question and options; None unless every letter is there.

    Ti-MMLU stores question and options in one string, one ``A``/``B``/``C``/``D`` line per option.
    """
    question, options = [], {}
    for line in text.split("\n"):
        m = _OPTION_LINE.match(line)
        if m and m.group(1) in letters and m.group(1) not in options and (options or question):
            options[m.group(1)] = m.group(2)
        elif options:
            return None  # text after the options: not the expected layout
        else:
            question.append(line)
    if list(options) != letters:
        return None
    return "\n".join(question).strip(), [options[k] for k in letters]


def build_examples(
    cfg: TaskConfig, data_root: str = DEFAULT_DATA_ROOT, limit: int | None = None, seed: int = 1234
):
    """Format a record-based task into :class:`Example`s, with few-shot demonstrations where asked.

    Few-shot examples are drawn per item with a seeded RNG (the same draws on every run and batch size) from
    the ``fewshot`` file, or from the test file itself minus the item (a dev pool, as for Ti-MMLU).

    Args:
        cfg: a checked task config.
        data_root: what ``{data_root}`` in its paths stands for.
        limit: keep a seeded sample of this many records (order kept).
        seed: seed of the sample and the few-shot draws.

    Returns:
        ``(examples, skipped)``: the examples and the number of records left out because their options could
        not be parsed.
    """
    test_path = _resolve(cfg.test, data_root)
    test = [_normalize(cfg, r) for r in read_jsonl(test_path)]
    items = [(i, _format(cfg, r)) for i, r in enumerate(test)]
    skipped = sum(ex is None for _, ex in items)
    if skipped:
        logger.warning(
            "%s: %d of %d records skipped (options not in the expected layout)", cfg.name, skipped, len(test)
        )
    items = [(i, ex) for i, ex in items if ex is not None]
    if limit and limit < len(items):  # a seeded sample in file order: files sorted by label stay balanced
        keep = set(random.Random(f"{seed}-{cfg.name}-limit").sample(range(len(items)), limit))
        items = [it for k, it in enumerate(items) if k in keep]
    if cfg.num_fewshot:  # the pool is read only when examples are drawn from it: without shots it may be missing
        pool_path = _resolve(cfg.fewshot, data_root) if cfg.fewshot else test_path
        same_pool = os.path.abspath(pool_path) == os.path.abspath(test_path)
        if not os.path.isfile(pool_path):
            raise YakError(f"task {cfg.name}: num_fewshot={cfg.num_fewshot} draws examples from {pool_path}, which "
                           "does not exist; put the task's few-shot file there or use --num_fewshot 0")
        pool = test if same_pool else [_normalize(cfg, r) for r in read_jsonl(pool_path)]
        formatted_pool = [_format(cfg, r) for r in pool]
        usable = [j for j, ex in enumerate(formatted_pool) if ex is not None]
        if cfg.num_fewshot > len(usable) - int(same_pool):
            raise YakError(
                f"task {cfg.name}: num_fewshot={cfg.num_fewshot} but the few-shot pool {pool_path} has "
                f"{len(usable)} usable records"
            )
    examples = []
    for i, ex in items:
        if cfg.num_fewshot:
            rng = random.Random(f"{seed}-{cfg.name}-{i}")
            candidates = [j for j in usable if not (same_pool and j == i)]
            shots = [formatted_pool[j] for j in rng.sample(candidates, cfg.num_fewshot)]
            demos = [
                s.prompt + (s.continuations[s.gold] if s.continuations else " " + s.reference) for s in shots
            ]
            ex.prompt = cfg.fewshot_separator.join(demos + [ex.prompt])
        examples.append(ex)
    return examples, skipped


def _normalize(cfg: TaskConfig, rec: dict) -> dict:
    rec = dict(rec)
    for fld, how in cfg.normalize.items():
        if isinstance(rec.get(fld), str):
            rec[fld] = NORMALIZERS[how](rec[fld])
    return rec


def _format(cfg: TaskConfig, rec: dict) -> Example | None:
    """One record as an Example (prompt without shots); None when its options cannot be parsed."""
    fmt = dict(rec)
    if cfg.kind == "classification":
        verb = _verbalizers(cfg)
        labels = list(verb)
        conts = [cfg.target.format(choice=verb[label]) for label in labels]
        return Example(cfg.prompt.format(**fmt), conts, labels.index(str(rec[cfg.label_field])), record=rec)
    if cfg.kind == "multiple_choice":
        if cfg.choices_field:
            question, options = str(rec[cfg.question_field]), [str(o) for o in rec[cfg.choices_field]]
            if len(options) != len(cfg.letters):
                return None
        else:
            parsed = split_options(str(rec[cfg.question_field]), cfg.letters)
            if parsed is None:
                return None
            question, options = parsed
        gold = _answer_index(rec[cfg.answer_field], cfg.letters)
        if gold is None:
            return None
        fmt.update(question=question, options="\n".join(f"{k}. {o}" for k, o in zip(cfg.letters, options)))
        shown = cfg.letters if cfg.scoring == "letter" else options
        return Example(
            cfg.prompt.format(**fmt), [cfg.target.format(choice=c) for c in shown], gold, record=rec
        )
    return Example(cfg.prompt.format(**fmt), reference=str(rec[cfg.reference_field]), record=rec)


def _answer_index(answer, letters: list[str]) -> int | None:
    """The option index of an answer given as a letter (``"B"``) or an index (``1``); None if neither."""
    if isinstance(answer, int):
        return answer if 0 <= answer < len(letters) else None
    answer = str(answer).strip()
    return letters.index(answer) if answer in letters else None


def lm_files(cfg: TaskConfig, data_root: str = DEFAULT_DATA_ROOT) -> list[str]:
    """The text files of a language-modelling or tokenizer task, sorted, each glob expanded."""
    out = []
    for pattern in cfg.files:
        out += sorted(glob.glob(_resolve(pattern, data_root)))
    return out


def resolve_path(path: str, data_root: str = DEFAULT_DATA_ROOT) -> str:
    """A config path with ``{data_root}`` filled in."""
    return _resolve(path, data_root)
