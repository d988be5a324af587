"""Benchmark the continued-pretraining data preparation (yak.data.build_pretraining_datasets).

Measures (1) the throughput of one process (one tokenizer thread, preprocessing_num_workers=1) that
checks, tokenizes, groups and caches Tibetan text from a fresh cache, in MB of UTF-8 text per second, for
each tokenizer given; (2) the time a second run takes to load the shipped sample (data/pt) from its cache,
inside the process (the call) and as a whole new process (interpreter start, imports, tokenizer load, call).
Targets: at least 2 MB/s per process; a second run under 2 s.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a file: python bench/data_prep.py

from yak.cli import parse_args, run_main, setup_logging  # noqa: E402

TOKENIZERS = "tokenizer/merged_tokenizer_hf,tokenizer/stories260K_bo/merged_tokenizer_hf,tokenizer/llama2,models/stories260K"


@dataclass
class BenchArguments:
    tibetan_dir: str = field(
        default="../shared/data/corpus/bo",
        metadata={"help": "Folder of Tibetan *.txt files for the throughput run (falls back to data/pt/bo)."},
    )
    max_mb: float = field(default=8.0, metadata={"help": "Use the first files up to this many MB of text."})
    tokenizers: str = field(
        default=TOKENIZERS,
        metadata={"help": "Comma-separated tokenizer folders, relative to the repository; absent ones are skipped."},
    )
    block_size: int = field(default=512, metadata={"help": "Tokens per block."})
    workers: str = field(
        default="1", metadata={"help": "Comma-separated preprocessing_num_workers values for the throughput run."}
    )


def _name(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _tibetan_sample(src: Path, dest: Path, max_bytes: float) -> int:
    """Link the first files of ``src`` (sorted) into ``dest/bo`` up to ``max_bytes``; returns their bytes."""
    (dest / "bo").mkdir(parents=True)
    total = 0
    for path in sorted(src.glob("*.txt")):
        if total >= max_bytes:
            break
        (dest / "bo" / path.name).symlink_to(path.resolve())
        total += path.stat().st_size
    return total


def _throughput(tokenizer_dir: Path, data: Path, nbytes: int, block_size: int, workers: int) -> dict:
    from yak.data import DataArguments, build_pretraining_datasets
    from yak.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    with tempfile.TemporaryDirectory() as cache:
        args = DataArguments(dataset_dir=str(data), data_cache_dir=cache, block_size=block_size,
                             preprocessing_num_workers=workers, validation_split_percentage=0)
        start, cpu = time.perf_counter(), time.process_time()
        ds = build_pretraining_datasets(tok, args)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    tokens = len(ds["train"]) * block_size
    return {"tokenizer": _name(tokenizer_dir), "MB": round(nbytes / 1e6, 2),
            "tokens": tokens, "bytes/token": round(nbytes / tokens, 2), "processes": workers,
            "seconds": round(seconds, 2), "MB/s": round(nbytes / 1e6 / seconds, 2),
            "MB/s per process": round(nbytes / 1e6 / seconds / workers, 2),
            # on a shared machine the wall clock counts other jobs' time; one process's CPU time does not
            "MB per CPU-second": round(nbytes / 1e6 / cpu, 2) if workers == 1 else None}


# A training script imports datasets anyway (transformers' Trainer does): timed apart from the call.
_SECOND_RUN = """
import time
from yak.data import DataArguments, build_pretraining_datasets
from yak.tokenizer import load_tokenizer
tok = load_tokenizer({tok!r})
args = DataArguments(dataset_dir={data!r}, data_cache_dir={cache!r}, block_size={bs})
start = time.perf_counter()
import datasets
imported = time.perf_counter()
build_pretraining_datasets(tok, args)
print(imported - start, time.perf_counter() - imported)
"""


def _second_run(tokenizer_dir: Path, block_size: int) -> dict:
    from yak.data import DataArguments, build_pretraining_datasets
    from yak.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    with tempfile.TemporaryDirectory() as cache:
        args = DataArguments(dataset_dir=str(ROOT / "data" / "pt"), data_cache_dir=cache, block_size=block_size)
        start = time.perf_counter()
        build_pretraining_datasets(tok, args)
        first = time.perf_counter() - start
        start = time.perf_counter()
        build_pretraining_datasets(tok, args)
        second = time.perf_counter() - start
        code = _SECOND_RUN.format(tok=str(tokenizer_dir), data=args.dataset_dir, cache=cache, bs=block_size)
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
        process = time.perf_counter() - start
    import_s, call_s = map(float, out.stdout.split()[-2:])
    return {"tokenizer": _name(tokenizer_dir), "first run (s)": round(first, 2),
            "second run, same process (s)": round(second, 3),
            "new process: import datasets (s)": round(import_s, 2),
            "new process: call (s)": round(call_s, 3),
            "new process: whole (s)": round(process, 2)}


@run_main
def main() -> None:
    (args,) = parse_args([BenchArguments], description=__doc__)
    # One tokenizer thread, so the figure is per process (read when tokenizers first encodes).
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    setup_logging(logging.WARNING)
    import pandas as pd

    tokenizers = [ROOT / t for t in args.tokenizers.split(",") if (ROOT / t).is_dir()]
    src = (ROOT / args.tibetan_dir) if (ROOT / args.tibetan_dir).is_dir() else ROOT / "data" / "pt" / "bo"
    with tempfile.TemporaryDirectory() as tmp:
        nbytes = _tibetan_sample(src, Path(tmp), args.max_mb * 1e6)
        rows = [_throughput(t, Path(tmp), nbytes, args.block_size, int(w))
                for t in tokenizers for w in args.workers.split(",")]
    print(f"\nTibetan text from {src}, one tokenizer thread a process, block_size {args.block_size}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}:\n")
    print(pd.DataFrame(rows).to_markdown(index=False))
    rows = [_second_run(t, args.block_size) for t in tokenizers]
    print("\nShipped sample data/pt (1.1 MB, bo/en/zh, default mix), second run from the cache:\n")
    print(pd.DataFrame(rows).to_markdown(index=False))


if __name__ == "__main__":
    main()
