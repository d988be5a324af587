"""The merge's entry point: plan, write into a new folder beside the output, then rename it in place."""

from __future__ import annotations

import logging
import math
import shutil
import time
from pathlib import Path

from yak.formats import MERGE_FILE, TOKENIZER_FILES, base_record, merged_adapters
from yak.io import atomic_write_json
from yak.merge.plan import MergeArguments, output_bytes, plan_merge
from yak.merge.write import write_huggingface, write_pth
from yak.outdir import replace_dir
from yak.source import ModelSource

logger = logging.getLogger(__package__)  # "yak.merge", the name the --verbose lines have always shown


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
            files = write_pth(plan, tmp, args.num_shards)
        else:
            files = write_huggingface(plan, tmp)
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
        ("size", f"{output_bytes(plan) / 2**30:.3f} GiB"),
        ("time", f"{time.time() - start:.1f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    logger.info("merge summary\n%s", "\n".join(f"  {k:<{width}}  {v}" for k, v in rows))
    return Path(args.output_dir)
