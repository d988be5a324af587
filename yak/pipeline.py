"""The shipped pipeline's stage chaining: ``python -m yak.pipeline pt|sft|merge-export [train.py options]``.

The shell wrappers (``run_pt.sh``, ``run_sft.sh``, ``run_merge_export.sh``) only set the original project's
variables and call this module; every decision is taken here, in Python, where it can be read and tested:

* ``pt``: stage 1 (embeddings) then stage 2 (LoRA+ on top of stage 1's output). A finished stage is skipped
  (it says so), an unfinished one is started again and resumes from its newest complete checkpoint (train.py
  does that); ``--overwrite_output_dir`` trains both stages again.
* ``sft``: one instruction-tuning run, skipped when finished.
* ``merge-export``: the low-memory merge to Hugging Face (and Meta ``.pth``) format, then GGUF for llama.cpp
  as ``GGUF`` says: ``auto`` (when llama.cpp is installed), ``1`` (an error when it is not) or ``0``.

One process without DeepSpeed runs ``train.py`` directly; several processes, several nodes or DeepSpeed run
it under ``torchrun`` (``torch.distributed.run`` of this Python). Extra arguments go to every ``train.py``.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from yak import YakError

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
WRAPPERS = {"pt": "run_pt.sh", "sft": "run_sft.sh", "merge-export": "run_merge_export.sh"}
# where run_pt.sh and run_sft.sh write by default, in the order their outputs apply
PIPELINE_OUTPUTS = ("output/pt/stage1", "output/pt/stage2", "output/sft")


class Variables:
    """The wrapper's variables, read from the environment it exported (``set -a``)."""

    def __init__(self, env: Mapping[str, str], wrapper: str):
        self.env, self.wrapper = env, wrapper

    def __call__(self, name: str) -> str:
        if name not in self.env:
            raise YakError(f"the variable {name} is not set; run the pipeline through {self.wrapper}, which sets "
                           "every variable it needs (or set it yourself)")
        return self.env[name]

    def flag(self, name: str) -> bool:
        """A 0/1 switch."""
        value = self(name)
        if value not in ("0", "1"):
            raise YakError(f"{name}={value!r}: give 0 or 1")
        return value == "1"

    def words(self, name: str) -> list[str]:
        """A space-separated list (``ADAPTERS="output/pt/stage1 output/pt/stage2"``)."""
        return self(name).split()


# ---------------------------------------------------------------------------------------------- launching


def launcher(v: Variables, uses_deepspeed: bool) -> list[str]:
    """The command that starts ``train.py``: this Python alone, or torchrun for several processes or DeepSpeed.

    On one node without ``MASTER_PORT``, torchrun runs ``--standalone`` and takes a free port, so two runs on
    one machine never collide.
    """
    gpus, nodes = v("GPUS"), v("NODES")
    for name, value in (("GPUS", gpus), ("NODES", nodes)):
        if not value.isdigit() or int(value) < 1:
            raise YakError(f"{name}={value!r}: give a number of at least 1")
    if gpus == "1" and nodes == "1" and not uses_deepspeed:
        return [sys.executable, str(ROOT / "train.py")]
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    if nodes == "1" and not v("MASTER_PORT"):
        return [*torchrun, "--standalone", "--nproc_per_node", gpus, str(ROOT / "train.py")]
    return [*torchrun, "--nnodes", nodes, "--node_rank", v("NODE_RANK"), "--nproc_per_node", gpus,
            "--master_addr", v("MASTER_ADDR"), "--master_port", v("MASTER_PORT") or "29500", str(ROOT / "train.py")]


def device_args(v: Variables, gpu_extra: Sequence[str] = ()) -> list[str]:
    """``--use_cpu`` (one thread per process for the tiny model) on the CPU, else the GPU options."""
    device = v("DEVICE")
    if device not in ("cpu", "gpu"):
        raise YakError(f"DEVICE={device!r}: give cpu or gpu")
    if device == "cpu":
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        return ["--use_cpu"]
    return list(gpu_extra)


def run_stage(command: list[str], what: str) -> None:
    """Run one training process (group) to its end; a failure stops the pipeline with train.py's status."""
    logger.info("%s: %s", what, " ".join(command))
    env = dict(os.environ)
    if not env.get("MASTER_PORT"):  # exported empty by the wrapper (set -a): torch would read "" as a port
        env.pop("MASTER_PORT", None)
    done = subprocess.run(command, check=False, env=env)
    if done.returncode:
        print(f"error: {what} failed (exit status {done.returncode}); see the messages above", file=sys.stderr)
        raise SystemExit(done.returncode)


def overwrite_requested(extra: Sequence[str]) -> bool:
    """Whether the extra train.py options turn ``--overwrite_output_dir`` on (as train.py itself reads it:
    ``--overwrite_output_dir``, ``--overwrite_output_dir true``, ``--overwrite_output_dir=false``, ...)."""
    from transformers.hf_argparser import string_to_bool

    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--overwrite_output_dir", nargs="?", const=True, default=False, type=string_to_bool)
    try:
        return parser.parse_known_args(list(extra))[0].overwrite_output_dir
    except SystemExit:  # a value that is no boolean: train.py reports it
        return False


def finished(folder: Path) -> bool:
    from yak.training.run_folder import has_final_output

    return has_final_output(folder)


# ---------------------------------------------------------------------------------------------- the stages


def run_pt(v: Variables, extra: Sequence[str]) -> None:
    """Stage 1 then stage 2, skipping a finished stage; see the module docstring."""
    deepspeed = v("DEEPSPEED") if v("DEVICE") == "gpu" else ""
    gpu = [*(["--compile_layers"] if v.flag("COMPILE_LAYERS") else []),
           *(["--gradient_checkpointing"] if v.flag("GRAD_CKPT") else []),
           *(["--deepspeed", deepspeed] if deepspeed else [])]
    common = [
        "--model_name_or_path", v("BASE"),
        "--dataset_dir", v("DATA"), "--data_cache_dir", v("CACHE"), "--validation_split_percentage", "1",
        "--block_size", v("BLOCK_SIZE"), "--torch_dtype", v("DTYPE"),
        "--per_device_train_batch_size", v("BATCH"), "--per_device_eval_batch_size", v("BATCH"),
        "--gradient_accumulation_steps", v("GRAD_ACC"),
        "--lr_scheduler_type", "cosine", "--warmup_steps", v("WARMUP_STEPS"), "--weight_decay", "0.01",
        "--logging_steps", v("LOGGING_STEPS"), "--save_steps", v("SAVE_STEPS"), "--save_total_limit", "3",
        "--seed", "42", "--report_to", "none", *device_args(v, gpu),
    ]  # fmt: skip
    launch = launcher(v, bool(deepspeed))
    out = Path(v("OUT"))
    stage1, stage2 = out / "stage1", out / "stage2"
    overwrite = overwrite_requested(extra)
    # Started again after a crash in stage 2, the pipeline goes on with stage 2 (which resumes from its
    # checkpoint); with --overwrite_output_dir both stages are trained again (not stage 2 alone, on the old
    # stage 1).
    skip1 = finished(stage1) and not overwrite
    if skip1 and finished(stage2):
        print(f"stage 1 and stage 2 already finished in {out} (delete a stage's folder, or pass "
              "--overwrite_output_dir, to train again): nothing to do", flush=True)
        return
    if skip1:
        print(f"stage 1 already finished in {stage1} (delete that folder, or pass --overwrite_output_dir, to "
              "train it again): going on with stage 2", flush=True)
    else:
        run_stage([*launch, *common, "--stage", "1", "--tokenizer_name_or_path", v("TOKENIZER"),
                   "--learning_rate", v("STAGE1_LR"), "--max_train_tokens", v("STAGE1_TOKENS"),
                   "--output_dir", str(stage1), *extra], "stage 1")
    run_stage([*launch, *common, "--stage", "2", "--adapters", str(stage1),
               "--lora_rank", v("LORA_RANK"), "--lora_alpha", v("LORA_ALPHA"), "--lora_dropout", v("LORA_DROPOUT"),
               "--trainable", v("TRAINABLE"), "--modules_to_save", v("MODULES_TO_SAVE"),
               "--learning_rate", v("LR"), "--loraplus_lr_ratio", v("LORAPLUS_RATIO"),
               "--embedding_learning_rate", v("EMBEDDING_LR"), "--max_train_tokens", v("STAGE2_TOKENS"),
               "--output_dir", str(stage2), *extra], "stage 2")
    print(f"done: stage 1 in {stage1}, stage 2 in {stage2} (apply both, in this order: docs/formats.md)")


def run_sft(v: Variables, extra: Sequence[str]) -> None:
    """One SFT run on the base model (and the ``ADAPTERS``, in order), skipped when finished."""
    deepspeed = v("DEEPSPEED")
    options = [*device_args(v, ["--gradient_checkpointing"]), *(["--deepspeed", deepspeed] if deepspeed else [])]
    if v("ADAPTERS"):
        options += ["--adapters", *v.words("ADAPTERS")]
    if v("TOKENIZER"):
        options += ["--tokenizer_name_or_path", v("TOKENIZER")]
    if "SYSTEM_PROMPT" in v.env:  # unset: the chat template's default; "": no system block
        options += ["--system_prompt", v("SYSTEM_PROMPT")]
    if v("VALIDATION") != "0":
        options += ["--eval_strategy", "steps", "--eval_steps", v("SAVE_STEPS")]
    out = Path(v("OUT"))
    if finished(out) and not overwrite_requested(extra):
        print(f"SFT already finished in {out} (delete that folder, or pass --overwrite_output_dir, to train it "
              "again): nothing to do", flush=True)
        return
    run_stage([
        *launcher(v, bool(deepspeed)),
        "--task", "sft", "--model_name_or_path", v("BASE"),
        "--dataset_dir", v("DATA"), "--data_cache_dir", v("CACHE"), "--validation_split_percentage", v("VALIDATION"),
        "--max_seq_length", v("MAX_SEQ_LENGTH"), "--packing", v("PACKING"),
        "--preprocessing_num_workers", v("WORKERS"), "--torch_dtype", v("DTYPE"),
        "--lora_rank", v("LORA_RANK"), "--lora_alpha", v("LORA_ALPHA"), "--lora_dropout", v("LORA_DROPOUT"),
        "--trainable", v("TRAINABLE"), "--modules_to_save", v("MODULES_TO_SAVE"),
        "--learning_rate", v("LR"), "--loraplus_lr_ratio", v("LORAPLUS_RATIO"),
        "--embedding_learning_rate", v("EMBEDDING_LR"),
        "--per_device_train_batch_size", v("BATCH"), "--per_device_eval_batch_size", v("BATCH"),
        "--gradient_accumulation_steps", v("GRAD_ACC"), "--num_train_epochs", v("EPOCHS"),
        "--lr_scheduler_type", "cosine", "--warmup_ratio", v("WARMUP_RATIO"), "--weight_decay", "0",
        "--logging_steps", "10", "--save_steps", v("SAVE_STEPS"), "--save_total_limit", "3",
        "--seed", "42", "--report_to", "none", *options, "--output_dir", str(out), *extra,
    ], "SFT")  # fmt: skip
    print(f"done: the SFT adapter is in {out} (apply after {v('ADAPTERS') or 'the base model'}: docs/formats.md)")


def run_merge_export(v: Variables, extra: Sequence[str]) -> None:
    """Merge to Hugging Face (and ``.pth``) format, then GGUF as ``GGUF`` says (auto, 1 or 0)."""
    from yak.cli import verbose_logs
    from yak.gguf import GGUFArguments, export_gguf, gguf_howto, gguf_problems
    from yak.merge import MergeArguments, merge
    from yak.source import ModelSource

    if extra:
        raise YakError(f"{WRAPPERS['merge-export']} takes no options ({' '.join(extra)}); set its variables instead "
                       "(--help lists them)")
    mode = v("GGUF")
    if mode not in ("auto", "0", "1"):
        raise YakError(f"GGUF={mode!r}: give auto (GGUF when llama.cpp is installed), 1 (GGUF, or an error) or 0")
    gguf_args = GGUFArguments(model_dir=v("output_dir"), output_dir=v("gguf_dir"), outtype="f16",
                              quant_types=v("quant_types"), check_file=v("check_file") or None,
                              llama_cpp_dir=v("llama_cpp_dir") or None)
    missing = gguf_problems(gguf_args) if mode != "0" else []
    if mode == "1" and missing:  # before the merge: nothing is written when the whole job cannot be done
        raise YakError("GGUF=1, but GGUF export is not possible here:\n  - " + "\n  - ".join(missing)
                       + f"\n{gguf_howto()}; or run with GGUF=auto or GGUF=0")
    if v.flag("verbose"):
        verbose_logs()
    source = ModelSource(base_model=v("base_model"), adapters=v("lora_model") or default_adapters(),
                         dtype=v("output_dtype"))
    merge(source, MergeArguments(output_type="huggingface", max_shard_size="5GB", output_dir=v("output_dir")))
    if v("pth_dir"):  # Meta's consolidated.NN.pth layout as well
        merge(source, MergeArguments(output_type="pth", output_dir=v("pth_dir")))
    if mode == "0":
        print("GGUF=0: no GGUF export")
    elif missing:
        print(f"GGUF skipped: llama.cpp is not set up here (GGUF=1 says what is missing); {gguf_howto()}")
    else:
        files = export_gguf(gguf_args)
        print(f"GGUF: {', '.join(str(f) for f in files)}")
        print(f"chat with llama.cpp: llama-cli -m {files[-1]} -cnv --chat-template llama2")


def default_adapters() -> str:
    """The finished outputs of run_pt.sh and run_sft.sh at their default places, in order, comma-separated."""
    found = [p for p in PIPELINE_OUTPUTS if finished(ROOT / p)]
    if not found:
        raise YakError(f"lora_model is empty and none of {', '.join(PIPELINE_OUTPUTS)} holds a finished run: run "
                       "sh run_pt.sh (and sh run_sft.sh) first, or set lora_model=DIR1,DIR2,...")
    logger.info("lora_model: the finished pipeline outputs %s", ",".join(found))
    return ",".join(found)


STAGES = {"pt": run_pt, "sft": run_sft, "merge-export": run_merge_export}


def print_help(wrapper: str) -> None:
    """The wrapper's comment block (its variables are documented there, next to their defaults)."""
    for line in (ROOT / wrapper).read_text(encoding="utf-8").splitlines()[1:]:
        if not line.startswith("#"):
            break
        print(line[2:] if line.startswith("# ") else line[1:])


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m yak.pipeline STAGE [train.py options]``."""
    from yak.cli import run_main, setup_logging

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in STAGES:
        print(f"usage: python -m yak.pipeline {{{','.join(STAGES)}}} [options]; run through "
              f"{', '.join(WRAPPERS.values())}", file=sys.stderr)
        raise SystemExit(2)
    stage, extra = argv[0], argv[1:]
    if extra in (["--help"], ["-h"]):
        print_help(WRAPPERS[stage])
        return

    @run_main
    def run() -> None:
        setup_logging()
        STAGES[stage](Variables(os.environ, WRAPPERS[stage]), extra)

    run()


if __name__ == "__main__":
    main()
