"""Ablation of the method (issue 18): what each part buys, in bits per byte of held-out text.

Every arm trains the same base model, through train.py's own code path (``parse_train_args`` then
``run_training``), on exactly the same training text (the same bytes), once per seed:

  a  the base tokenizer (byte fallback for Tibetan), no new vocabulary; stage 2 (LoRA+ and the embeddings)
  b  the merged tokenizer, new rows initialised at random (``--new_rows_init random``); stage 2
  c  the merged tokenizer, new rows initialised as the mean of their base pieces; stage 2
  d  (c) with stage 1 (embeddings only) first, then stage 2: the published method
  e  (d) with plain LoRA (``--loraplus_lr_ratio 1``) instead of LoRA+
  f  (d) on Tibetan only instead of the Tibetan : English+Chinese = 3 : 4 mix

**Same bytes, not the same tokens.** Tokenizers cut the same text into different numbers of tokens, so a
token budget would give the base tokenizer (about one token per Tibetan byte) far less text than the merged
one. The script therefore builds the training text itself, by bytes: ``--budget_bytes`` split over the
groups of ``--mix`` (3 : 4 in bytes; inside a group evenly over its sources, inside a source evenly over its
``*.txt`` files, from the start of each file), and every run trains one epoch over it with ``--mix none``.
Every arm of the mix sees the same text; arm f sees the same number of Tibetan-only bytes. (train.py's own
``--mix`` weighs sources in tokens; mixing by bytes here avoids giving the base tokenizer's arm a smaller
Tibetan share of the text.) In the two-stage arms, stage 1 trains on the first ``--stage1_share`` of each
file's slice and stage 2 on the rest: the same text as the one-stage arms, split between the stages.

Held-out text (``--heldout NAME=FILE``; the first ``--eval_bytes`` bytes of each) is scored with the
evaluation's sliding-window scorer (``yak.evaluation.scoring.Scorer.rolling_nll``, bits per byte as
``evaluate.py`` computes them) before training and at ``--eval_points`` points of the byte budget. Written to
``--output_dir`` (atomically): ``results.json`` (every curve of every run), ``results.md`` (the table: mean
and half the range over seeds; the effect of each part of the method), ``ablation.png`` (bits per byte
against training bytes, a line per arm, a panel per held-out text) and ``runs/`` (each run's train.py
output). Training tokens/s leave out the evaluation time.

    python bench/ablation.py                  # tiny model, shared corpus: 36 min on 2 shared cores (RESULTS.md)
    python bench/ablation.py --arms c d --seeds 1 --budget_bytes 60000 --output_dir /tmp/abl
    # a real model on a GPU: extra train.py options go after "--" (they override the script's)
    python bench/ablation.py --model /models/llama-2-7b --tokenizer tokenizer/merged_tokenizer_hf \\
        --budget_bytes 200000000 --block_size 1024 --batch_size 8 --lora_rank 64 --lora_alpha 128 \\
        --learning_rate 2e-4 --stage1_learning_rate 1e-3 -- --torch_dtype bfloat16 --compile_layers
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python bench/ablation.py` from anywhere
    sys.path.insert(0, str(ROOT))

from transformers import TrainerCallback

from yak import YakError
from yak.cli import parse_args, run_main, setup_logging
from yak.data import parse_mix
from yak.io import atomic_output_dir, atomic_write_json, atomic_write_text, inputs_inside

logger = logging.getLogger("bench.ablation")


@dataclass(frozen=True)
class Arm:
    name: str
    description: str
    merged: bool = True  # the merged tokenizer (else the base model's own)
    init: str = "mean"
    stage1: bool = False
    loraplus: bool = True
    tibetan_only: bool = False


ARMS = {
    a.name: a
    for a in (
        Arm("a", "base tokenizer (byte fallback)", merged=False),
        Arm("b", "merged, random init", init="random"),
        Arm("c", "merged, mean-of-pieces init"),
        Arm("d", "(c) + stage 1", stage1=True),
        Arm("e", "(d) with plain LoRA", stage1=True, loraplus=False),
        Arm("f", "(d) on Tibetan only", stage1=True, tibetan_only=True),
    )
}
# what each part of the method is measured by: (part, arm without it, arm with it)
CONTRASTS = [
    ("vocabulary extension", "a", "c"),
    ("mean-of-pieces init (vs random)", "b", "c"),
    ("stage 1 (embeddings first)", "c", "d"),
    ("LoRA+ (vs plain LoRA)", "e", "d"),
    ("3:4 mix (vs Tibetan only)", "f", "d"),
]
DEFAULT_HELDOUT = [
    f"{name}=data/heldout/{file}"
    for name, file in (
        ("bo_modern", "bo_modern_nanhai_deseg_heldout.txt"),
        ("bo_classical", "bo_classical_kangyur_vol078_heldout.txt"),
        ("en", "en_moby_dick_heldout.txt"),
        ("zh", "zh_hongloumeng_ch81-120_heldout.txt"),
    )
]


@dataclass
class AblationArguments:
    """Options of bench/ablation.py; train.py options after "--" are passed to every training run."""

    output_dir: str = field(default="ablation_out", metadata={"help": "Run folder (written atomically)."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing --output_dir."})
    model: str = field(default="models/stories260K", metadata={"help": "Base model folder."})
    tokenizer: str = field(
        default="tokenizer/stories260K_bo/merged_tokenizer_hf",
        metadata={"help": "Merged tokenizer of arms b-f (arm a uses the model's own)."},
    )
    corpus: str = field(
        default="../shared/data/corpus",
        metadata={"help": "Training text: one sub-folder per source (bo/, en/, zh/) of *.txt files."},
    )
    heldout: list[str] = field(
        default_factory=lambda: list(DEFAULT_HELDOUT),
        metadata={"help": "Held-out texts as NAME=FILE (a column of the table, a panel of the PNG each)."},
    )
    arms: list[str] = field(default_factory=lambda: list(ARMS), metadata={"help": "Arms to run (a-f)."})
    seeds: list[int] = field(default_factory=lambda: [1, 2], metadata={"help": "Seeds; every arm runs each."})
    budget_bytes: int = field(default=600_000, metadata={"help": "Training text per run, in UTF-8 bytes."})
    mix: str = field(
        default="bo=3,en+zh=4",
        metadata={"help": "Byte shares of the source groups (train.py's --mix syntax, but in bytes)."},
    )
    stage1_share: float = field(
        default=0.25, metadata={"help": "Share of the bytes that stage 1 trains on in arms d-f."}
    )
    block_size: int = field(default=128, metadata={"help": "Tokens per training sequence."})
    batch_size: int = field(default=8, metadata={"help": "Sequences per step (per device)."})
    learning_rate: float = field(
        default=1e-3, metadata={"help": "Stage 2: LoRA A and the embeddings (B: x --loraplus_lr_ratio)."}
    )
    stage1_learning_rate: float = field(default=5e-3, metadata={"help": "Stage 1 (embeddings only)."})
    loraplus_lr_ratio: float = field(default=16.0, metadata={"help": "LoRA+ ratio of the LoRA+ arms."})
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha."})
    eval_points: int = field(
        default=4, metadata={"help": "Held-out evaluations along the budget, besides the one before training."}
    )
    eval_bytes: int = field(default=12_000, metadata={"help": "Bytes scored of each held-out text."})
    eval_batch_size: int = field(default=16, metadata={"help": "Windows per forward pass when scoring."})


# ------------------------------------------------------------------------------------------------ checks


def check(args: AblationArguments) -> tuple[list, dict[str, Path]]:
    """Every problem at once. Returns the parsed byte mix and the held-out files by name."""
    problems = []
    unknown = [a for a in args.arms if a not in ARMS]
    if unknown or not args.arms:
        problems.append(f"--arms {' '.join(args.arms)}: choose among {' '.join(ARMS)}")
    if not args.seeds or len(set(args.seeds)) != len(args.seeds):
        problems.append(f"--seeds must name one or more different seeds, found {args.seeds}")
    for opt in ("budget_bytes", "block_size", "batch_size", "lora_rank", "eval_points", "eval_bytes",
                "eval_batch_size"):  # fmt: skip
        if getattr(args, opt) < 1:
            problems.append(f"--{opt} must be >= 1, found {getattr(args, opt)}")
    if not 0 < args.stage1_share < 1:
        problems.append(f"--stage1_share must be between 0 and 1, found {args.stage1_share}")
    for opt in ("model", "tokenizer", "corpus"):
        if not Path(getattr(args, opt)).is_dir():
            problems.append(f"--{opt} {getattr(args, opt)} is not a folder")
    if os.path.exists(args.output_dir) and not args.overwrite:
        problems.append(f"--output_dir {args.output_dir} exists: choose another or pass --overwrite")
    heldout = {}
    for item in args.heldout:
        name, sep, path = item.partition("=")
        if not sep or not name or not Path(path).is_file():
            problems.append(f"--heldout {item}: expected NAME=FILE of an existing file")
        heldout[name] = Path(path)
    for path in inputs_inside(args.output_dir, [args.model, args.tokenizer, args.corpus, *heldout.values()]):
        problems.append(f"--output_dir {args.output_dir} is (or contains) the input {path}")
    groups = []
    try:
        groups = parse_mix(args.mix) or []
        if not groups:
            problems.append("--mix none: give the byte shares, e.g. bo=3,en+zh=4")
        if "f" in args.arms and not any("bo" in names for names, _ in groups):
            problems.append(f"--mix {args.mix} has no source 'bo' for the Tibetan-only arm f")
        for names, _ in groups:
            for source in names:
                if not sorted((Path(args.corpus) / source).glob("*.txt")):
                    problems.append(f"--corpus {args.corpus} has no *.txt files in {source}/ (named in --mix)")
    except YakError as e:
        problems.append(str(e))
    if problems:
        raise YakError("cannot run the ablation:\n  - " + "\n  - ".join(problems))
    return groups, heldout


# -------------------------------------------------------------------------------------------------- data


def _slice_lines(path: Path, start: int, end: int) -> list[str]:
    """The text between byte offsets ``start`` and ``end`` of the file's lines (newlines not counted), cut at
    line ends and, inside a line, before a character that would cross the offset."""
    out, pos = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            raw = line.rstrip("\n").encode("utf-8")
            lo, hi = max(start - pos, 0), min(end - pos, len(raw))
            if lo < hi:
                piece = raw[lo:hi].decode("utf-8", errors="ignore").strip()  # a cut character is dropped
                if piece:
                    out.append(piece)
            pos += len(raw)
            if pos >= end:
                break
    if pos < end:
        raise YakError(f"{path} has {pos:,} bytes of text, fewer than the {end:,} its share needs: lower "
                       "--budget_bytes or add text to the source")
    return out


def build_data(root: Path, corpus: Path, groups, budget: int, stage1_share: float) -> dict[str, dict]:
    """Write the training folders of one mix: ``all`` (the whole budget), ``stage1`` and ``stage2`` (the first
    ``stage1_share`` of each file's slice, and the rest). Returns, per folder, its path and bytes per source."""
    total = sum(w for _, w in groups)
    folders = {part: {"path": root / part, "bytes": {}} for part in ("all", "stage1", "stage2")}
    for names, weight in groups:
        for source in names:
            files = sorted((corpus / source).glob("*.txt"))
            share = budget * weight / total / len(names) / len(files)  # bytes of each file
            for path in files:
                n, cut = int(share), int(share * stage1_share)
                for part, (lo, hi) in (("all", (0, n)), ("stage1", (0, cut)), ("stage2", (cut, n))):
                    text = "\n".join(_slice_lines(path, lo, hi)) + "\n"
                    out = folders[part]["path"] / source / path.name
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_text(text, encoding="utf-8")
                    counts = folders[part]["bytes"]
                    counts[source] = counts.get(source, 0) + len(text.encode("utf-8")) - text.count("\n")
    return folders


def count_tokens(folder: Path, tokenizer) -> int:
    """Tokens of a training folder as train.py counts them: BOS (if the tokenizer adds it) + text + EOS."""
    n = 0
    for path in sorted(folder.rglob("*.txt")):
        lines = [line for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
        n += sum(len(ids) + 1 for ids in tokenizer(lines, verbose=False).input_ids)
    return n


# ------------------------------------------------------------------------------------------- evaluation


class HeldoutEval(TrainerCallback):
    """Score the held-out texts at given fractions of a training run's steps (0: before the first step).

    Args:
        evaluate: ``evaluate(model) -> {name: bits per byte}``.
        points: ``(fraction of this run's steps, training bytes at that point)`` pairs.
    """

    def __init__(self, evaluate, points: list[tuple[float, float]]):
        self.evaluate, self.points = evaluate, points
        self.curve: list[dict] = []
        self.seconds = 0.0
        self.at: dict[int, float] = {}

    def _run(self, model, step: int, n_bytes: float) -> None:
        start = time.perf_counter()
        was_training = model.training
        model.eval()
        bpb = self.evaluate(model)
        model.train(was_training)
        self.seconds += time.perf_counter() - start
        self.curve.append({"bytes": n_bytes, "step": step, "bits_per_byte": bpb})
        logger.info("  %s bytes (step %d): %s", f"{n_bytes:,.0f}", step,
                    "  ".join(f"{k} {v:.3f}" for k, v in bpb.items()))

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.at = {max(round(frac * state.max_steps), 1 if frac else 0): n for frac, n in self.points}
        if 0 in self.at:
            self._run(model, 0, self.at[0])

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step in self.at and state.global_step > 0:
            self._run(model, state.global_step, self.at[state.global_step])


def heldout_scorer(heldout: dict[str, Path], tokenizer, args: AblationArguments, max_length: int):
    """``evaluate(model) -> {name: bits per byte}`` over the first ``--eval_bytes`` of each held-out text."""
    from yak.evaluation.metrics import bits_per_unit
    from yak.evaluation.scoring import Scorer

    texts = {}
    for name, path in heldout.items():
        raw = path.read_bytes()[: args.eval_bytes]
        texts[name] = raw.decode("utf-8", errors="ignore")  # a character cut at the end is dropped

    def evaluate(model) -> dict[str, float]:
        scorer = Scorer(model, tokenizer, max_length, args.eval_batch_size)
        nll = scorer.rolling_nll(list(texts.values()), stride=max_length // 2, desc="held-out")
        return {n: bits_per_unit(v, len(t.encode("utf-8"))) for (n, t), (v, _) in zip(texts.items(), nll)}

    return evaluate


# -------------------------------------------------------------------------------------------------- runs


def train_argv(args: AblationArguments, arm: Arm, seed: int, stage: int, data: Path, out: Path, cache: Path,
               adapters: Path | None, extra: list[str]) -> list[str]:
    """train.py's options for one stage of one run."""
    argv = [
        "--model_name_or_path", args.model, "--dataset_dir", str(data), "--data_cache_dir", str(cache),
        "--mix", "none", "--validation_split_percentage", "0", "--block_size", str(args.block_size),
        "--preprocessing_num_workers", "1", "--per_device_train_batch_size", str(args.batch_size),
        "--num_train_epochs", "1", "--warmup_ratio", "0.05", "--lr_scheduler_type", "cosine",
        "--weight_decay", "0.01", "--seed", str(seed), "--output_dir", str(out), "--report_to", "none",
        "--save_strategy", "no", "--logging_steps", "10", "--plot_loss", "false", "--stage", str(stage),
    ]  # fmt: skip
    if adapters:
        argv += ["--adapters", str(adapters)]
    else:
        argv += ["--tokenizer_name_or_path", args.tokenizer if arm.merged else args.model]
        argv += ["--new_rows_init", arm.init]
    if stage == 1:
        argv += ["--learning_rate", str(args.stage1_learning_rate)]
    else:
        argv += ["--learning_rate", str(args.learning_rate), "--lora_rank", str(args.lora_rank),
                 "--lora_alpha", str(args.lora_alpha),
                 "--loraplus_lr_ratio", str(args.loraplus_lr_ratio if arm.loraplus else 1.0)]  # fmt: skip
    return argv + extra


def run_arm(args: AblationArguments, arm: Arm, seed: int, data: dict, heldout, root: Path, extra) -> dict:
    """Train one arm with one seed (one or two stages); its curve, tokens, throughput and wall time."""
    from yak.tokenizer import load_tokenizer
    from yak.training import parse_train_args, run_training

    start = time.perf_counter()
    tokenizer = load_tokenizer(args.tokenizer if arm.merged else args.model)
    evaluate = heldout_scorer(heldout, tokenizer, args, args.block_size)
    budget = sum(data["all"]["bytes"].values())
    fracs = [i / args.eval_points for i in range(args.eval_points + 1)]  # of the byte budget
    stages = [(1, "stage1", 0.0, args.stage1_share), (2, "stage2", args.stage1_share, 1.0)] if arm.stage1 \
        else [(2, "all", 0.0, 1.0)]
    curve, tokens, train_seconds, adapters = [], 0, 0.0, None
    for stage, part, lo, hi in stages:
        # this stage's evaluation points: the budget fractions inside (lo, hi], and 0 before the first stage
        points = [((f - lo) / (hi - lo), f * budget) for f in fracs if lo < f <= hi or f == lo == 0]
        callback = HeldoutEval(evaluate, points)
        out = root / "runs" / f"{arm.name}_seed{seed}" / f"stage{stage}"
        argv = train_argv(args, arm, seed, stage, data[part]["path"], out, root / "data_cache", adapters, extra)
        logger.info("arm %s (%s), seed %d, stage %d: %s bytes", arm.name, arm.description, seed, stage,
                    f"{sum(data[part]['bytes'].values()):,}")
        summary = run_training(*parse_train_args(argv), callbacks=[callback])
        curve += callback.curve
        tokens += count_tokens(data[part]["path"], tokenizer)
        train_seconds += summary["train_runtime"] - callback.seconds
        adapters = out
    return {
        "arm": arm.name, "seed": seed, "bytes": budget, "bytes_per_source": data["all"]["bytes"],
        "tokens": tokens, "tokens_per_byte": tokens / budget, "train_seconds": train_seconds,
        "tokens_per_second": tokens / max(train_seconds, 1e-9), "wall_seconds": time.perf_counter() - start,
        "curve": curve, "final": curve[-1]["bits_per_byte"],
    }  # fmt: skip


# ------------------------------------------------------------------------------------------------ report


def _stats(values: list[float]) -> tuple[float, float]:
    """Mean and half the range (the spread over seeds)."""
    return sum(values) / len(values), (max(values) - min(values)) / 2


def _cell(values: list[float], digits: int = 3) -> str:
    mean, spread = _stats(values)
    return f"{mean:.{digits}f} ± {spread:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def markdown(results: dict) -> str:
    runs, names = results["runs"], results["heldout"]
    arms = [a for a in ARMS if any(r["arm"] == a for r in runs)]
    by_arm = {a: [r for r in runs if r["arm"] == a] for a in arms}
    seeds = results["arguments"]["seeds"]
    lines = [
        (
            f"Bits per byte of held-out text after {results['budget_bytes']:,} bytes of training text per run "
            f"(lower is better); mean ± half the range over seeds {', '.join(map(str, seeds))}. Training "
            "tokens/s leave out evaluation; wall time is per run, evaluation included."
        ),
        "",
        "| arm | " + " | ".join(names) + " | tokens per byte | training tokens/s | wall s |",
        "|---|" + "---:|" * (len(names) + 3),
    ]
    for a in arms:
        rs = by_arm[a]
        cells = [_cell([r["final"][n] for r in rs]) for n in names]
        cells += [f"{rs[0]['tokens_per_byte']:.3f}", _cell([r["tokens_per_second"] for r in rs], 0),
                  _cell([r["wall_seconds"] for r in rs], 0)]  # fmt: skip
        lines.append(f"| {a}: {ARMS[a].description} | " + " | ".join(cells) + " |")
    lines += ["", "Before training (0 bytes):", "", "| arm | " + " | ".join(names) + " |",
              "|---|" + "---:|" * len(names)]  # fmt: skip
    for a in arms:
        start = [r["curve"][0]["bits_per_byte"] for r in by_arm[a]]
        lines.append(f"| {a} | " + " | ".join(_cell([s[n] for s in start]) for n in names) + " |")
    contrasts = [c for c in CONTRASTS if c[1] in by_arm and c[2] in by_arm]
    if contrasts:
        lines += ["", ("Effect of each part: bits per byte with it minus without it (negative: it helps); "
                       "'within spread' when the difference is smaller than the two arms' spreads together."), "",
                  "| part | arms | " + " | ".join(names) + " |", "|---|---|" + "---:|" * len(names)]  # fmt: skip
        for part, without, with_ in contrasts:
            cells = []
            for n in names:
                (m0, s0), (m1, s1) = (_stats([r["final"][n] for r in by_arm[x]]) for x in (without, with_))
                verdict = "within spread" if abs(m1 - m0) <= s0 + s1 else "helps" if m1 < m0 else "hurts"
                cells.append(f"{m1 - m0:+.3f} ({verdict})")
            lines.append(f"| {part} | {without} → {with_} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """Bits per byte against training bytes: a panel per held-out text, a line per arm (shade: seed range)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = results["heldout"]
    cols = min(len(names), 2)
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        for a, arm in ARMS.items():
            rs = [r for r in results["runs"] if r["arm"] == a]
            if not rs:
                continue
            xs = [p["bytes"] / 1000 for p in rs[0]["curve"]]
            ys = [[r["curve"][i]["bits_per_byte"][name] for r in rs] for i in range(len(xs))]
            ax.plot(xs, [sum(y) / len(y) for y in ys], "o-", ms=3, label=f"{a}: {arm.description}")
            ax.fill_between(xs, [min(y) for y in ys], [max(y) for y in ys], alpha=0.2)
        ax.set_title(f"held-out {name}")
        ax.set_xlabel("training text (kB)")
        ax.set_ylabel("bits per byte (log scale)")
        ax.set_yscale("log")  # before training, byte-fallback text costs ~35 bits per byte; after, 1-10
        ax.grid(alpha=0.3, which="both")
    for ax in axes.flat[len(names) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -------------------------------------------------------------------------------------------------- main


def ablation(args: AblationArguments, extra: list[str]) -> dict:
    """Run every arm with every seed and write the report to ``args.output_dir``. Returns the results."""
    groups, heldout = check(args)
    logger.info("arguments: %s; train.py options added: %s", dataclasses.asdict(args), extra)
    start = time.perf_counter()
    with atomic_output_dir(args.output_dir, overwrite=args.overwrite) as root:
        mixes = {"mix": groups}
        if any(ARMS[a].tibetan_only for a in args.arms):
            mixes["bo"] = [(("bo",), 1.0)]
        data = {k: build_data(root / "data" / k, Path(args.corpus), g, args.budget_bytes, args.stage1_share)
                for k, g in mixes.items()}  # fmt: skip
        runs = []
        for name in args.arms:
            arm = ARMS[name]
            for seed in args.seeds:
                runs.append(run_arm(args, arm, seed, data["bo" if arm.tibetan_only else "mix"], heldout, root,
                                    extra))
        results = {
            "arguments": dataclasses.asdict(args), "train_options": extra, "heldout": list(heldout),
            "budget_bytes": runs[0]["bytes"], "wall_seconds": time.perf_counter() - start, "runs": runs,
        }  # fmt: skip
        atomic_write_json(root / "results.json", results)
        atomic_write_text(root / "results.md", markdown(results))
        plot(results, root / "ablation.png")
    logger.info("wrote %s (%.0f s)\n%s", args.output_dir, results["wall_seconds"], markdown(results))
    return results


@run_main
def main() -> None:
    setup_logging()
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    (args,) = parse_args([AblationArguments], own, description=__doc__.split("\n\n")[0])
    ablation(args, extra)


if __name__ == "__main__":
    main()
