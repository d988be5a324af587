"""Training: continued pretraining (stage 1: embeddings; stage 2: LoRA+ and embeddings) and SFT.

One run reads top to bottom in :func:`run_training`: check the options, claim the output folder (or find
the checkpoint to resume), load the tokenizer, build the datasets, load and prepare the model, fix the
schedule, build the trainer, train, save, report. :class:`YakTrainer` is a ``transformers.Trainer`` with the
LoRA+ / embedding parameter groups, the project's output formats (docs/formats.md), and checkpoints that
count only once complete.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from yak import YakError
from yak.cli import parse_args
from yak.io import atomic_write_json, inputs_inside
from yak.modeling import (
    DTYPES,
    RUN_FILE,
    ModelArguments,
    adapter_kind,
    adapter_order_problems,
    apply_adapters,
    carries_lm_head,
    check_tokenizer_extends,
    compile_decoder_layers,
    embedding_keys,
    is_tied,
    kbits_problem,
    load_base_model,
    load_embeddings,
    prepare_lora,
    prepare_stage1,
    resize_and_init_embeddings,
    resize_for_adapters,
    save_embeddings,
)
from yak.tokenizer import load_tokenizer, save_tokenizer

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
COMPLETE_MARKER = "yak_checkpoint.json"  # written last: a checkpoint without it is incomplete
FINAL_TMP = ".final.tmp"
# The settings that define a run, recorded in its yak_run.json: an output folder whose run differs in any of
# them holds another run. Resuming promises the run it continues (the same data in the same order, the same
# schedule and optimizer steps), so these are what is trained on top of what, the data and its order, the
# length, and the optimizer. Speed, memory, precision, logging, saving and evaluation settings are not in it:
# they may change between restarts (e.g. on other hardware).
RUN_IDENTITY = (
    # what is trained, on top of what
    "task", "stage", "model_name_or_path", "tokenizer_name_or_path", "adapters",
    "lora_rank", "lora_alpha", "lora_dropout", "trainable", "modules_to_save",
    # the data and its order (the samples of a step are the same on any number of processes whose
    # batch size x gradient accumulation x processes is the same)
    "dataset_dir", "mix", "block_size", "max_seq_length", "packing", "system_prompt",
    "validation_split_percentage", "seed", "data_seed", "samples_per_step",
    # the length, the schedule and the optimizer
    "max_steps", "max_train_tokens", "num_train_epochs", "learning_rate", "embedding_learning_rate",
    "loraplus_lr_ratio", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "warmup_ratio",
    "optim", "optim_args", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm",
)  # fmt: skip
# the RUN_IDENTITY settings that name folders or files (a run file of an older version has them as typed)
PATH_SETTINGS = ("model_name_or_path", "tokenizer_name_or_path", "adapters", "dataset_dir")
DESCRIPTION = (
    "Continued pretraining (--task pt; --stage 1 trains the embeddings only, --stage 2 adds LoRA+ adapters "
    "and keeps training the embeddings) and instruction tuning (--task sft, LoRA+) of a Llama-2-family model "
    "with a merged tokenizer. Options come from the command line or one JSON/YAML file; every "
    "transformers TrainingArguments option is accepted (run under torchrun and --deepspeed for several "
    "GPUs). Checkpoints are resumed automatically from output_dir. See docs/training.md."
)


@dataclass
class StageArguments:
    """What is trained, with which learning rates, for how long."""

    task: str = field(
        default="pt",
        metadata={"help": "pt: continued pretraining; sft: instruction tuning.", "choices": ["pt", "sft"]},
    )
    stage: int = field(
        default=2,
        metadata={
            "help": "pt only. 1: train only the embeddings (embed_tokens, lm_head), every other weight "
            "frozen; 2: LoRA on --trainable plus the embeddings (--modules_to_save).",
            "choices": [1, 2],
        },
    )
    lora_rank: int = field(default=64, metadata={"help": "LoRA rank r."})
    lora_alpha: float = field(
        default=128.0, metadata={"help": "LoRA alpha (the update is scaled by alpha / r)."}
    )
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    trainable: str = field(
        default="q_proj,v_proj,k_proj,o_proj,gate_proj,down_proj,up_proj",
        metadata={"help": "Comma-separated module names that get LoRA adapters (stage 2, SFT)."},
    )
    modules_to_save: str = field(
        default="embed_tokens,lm_head",
        metadata={
            "help": "Comma-separated modules trained in full next to LoRA (stage 2, SFT); '' for none."
        },
    )
    loraplus_lr_ratio: float = field(
        default=16.0,
        metadata={
            "help": "LoRA+: learning rate of the B matrices over that of the A matrices (which use "
            "--learning_rate); 16 as in the LoRA+ paper (arXiv:2402.12354). 1 = plain LoRA."
        },
    )
    embedding_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "Learning rate of the trained embeddings (embed_tokens, lm_head); default: "
            "--learning_rate."
        },
    )
    warmup_ratio: float | None = field(
        default=None,
        metadata={
            "help": "Warm-up as a fraction of the total steps (the original's flag); converted to "
            "--warmup_steps, and refused when the warm-up would outlast an epoch of a run whose length "
            "comes from --num_train_epochs."
        },
    )
    max_train_tokens: int | None = field(
        default=None,
        metadata={
            "help": "pt only: train on this many tokens (sets --max_steps from block_size, batch size, "
            "gradient accumulation and the number of processes)."
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Delete an output_dir that holds a run with other settings (or a finished run) and "
            "start again; without it such a folder is an error."
        },
    )
    plot_loss: bool = field(
        default=True, metadata={"help": "Write loss.png (training/validation loss) at the end."}
    )

    def trainable_modules(self) -> list[str]:
        return [m.strip() for m in self.trainable.split(",") if m.strip()]

    def saved_modules(self) -> list[str]:
        return [m.strip() for m in self.modules_to_save.split(",") if m.strip()]

    @property
    def uses_lora(self) -> bool:
        return self.task == "sft" or self.stage == 2


# ------------------------------------------------------------------------------------------------------
# Arguments
# ------------------------------------------------------------------------------------------------------


def _data_arguments_class(task: str):
    # imported lazily: pt needs only yak.data, sft only yak.sft
    if task == "sft":
        from yak.sft import SFTDataArguments

        return SFTDataArguments
    from yak.data import DataArguments

    return DataArguments


def _peek_task(argv: Sequence[str]) -> str:
    """The ``--task`` value from the command line or the config file, before the full parse."""
    if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")) and os.path.isfile(argv[0]):
        import yaml

        text = Path(argv[0]).read_text(encoding="utf-8")
        try:
            config = json.loads(text) if argv[0].endswith(".json") else yaml.safe_load(text)
        except (ValueError, yaml.YAMLError):
            return "pt"  # parse_args reports the broken file
        return str(config.get("task", "pt")) if isinstance(config, dict) else "pt"
    for i, arg in enumerate(argv):
        if arg == "--task" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--task="):
            return arg.split("=", 1)[1]
    return "pt"


def parse_train_args(argv: Sequence[str] | None = None):
    """Parse ``(ModelArguments, StageArguments, data arguments, TrainingArguments)``.

    The data arguments are ``yak.data.DataArguments`` for ``--task pt`` and ``yak.sft.SFTDataArguments``
    for ``--task sft``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    task = _peek_task(argv)
    if task not in ("pt", "sft"):
        raise YakError(f"--task must be pt or sft, got {task!r}")
    classes = [ModelArguments, StageArguments, _data_arguments_class(task), TrainingArguments]
    return parse_args(classes, argv, description=DESCRIPTION)


def _checkpoint_dtype(model_dir: str) -> torch.dtype:
    from transformers import AutoConfig

    dtype = getattr(AutoConfig.from_pretrained(model_dir, trust_remote_code=False), "dtype", None)
    if isinstance(dtype, str):
        dtype = DTYPES.get(dtype)
    return dtype or torch.float32


def _report_to_problems(report_to: list[str]) -> list[str]:
    """``--report_to`` names that transformers does not know or whose package is not installed (the Trainer
    would only fail on them once the data is tokenized and the model loaded)."""
    from transformers.integrations import INTEGRATION_TO_CALLBACK, get_available_reporting_integrations

    installed = get_available_reporting_integrations()
    problems = []
    for name in report_to:
        if name in installed:
            continue
        found = "its package is not installed" if name in INTEGRATION_TO_CALLBACK else "unknown"
        problems.append(
            f"--report_to {name}: {found}; choose none, all or an installed integration "
            f"({', '.join(installed) or 'none is installed'}; transformers knows "
            f"{', '.join(INTEGRATION_TO_CALLBACK)})"
        )
    return problems


def check_args(model_args: ModelArguments, stage_args: StageArguments, data_args, training_args):
    """Check every option up front; raise one :class:`YakError` listing all problems.

    Returns:
        ``training_args``, with mixed precision switched on to match ``--torch_dtype`` (one dtype option:
        bfloat16 weights train under bf16 autocast, float16 under fp16).
    """
    from transformers import AutoConfig

    problems = []
    model_dir = model_args.model_name_or_path
    config = None
    if not model_dir:
        problems.append("--model_name_or_path is required")
    elif not (Path(model_dir) / "config.json").is_file():
        problems.append(f"--model_name_or_path {model_dir}: no config.json there")
    else:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    for name in ("tokenizer_name_or_path", "base_tokenizer_name_or_path"):
        path = getattr(model_args, name)
        if path and not Path(path).is_dir():
            problems.append(f"--{name} {path} is not a folder")
    for a in model_args.adapters:
        try:
            adapter_kind(a)
        except YakError as e:
            problems.append(f"--adapters: {e}")
    problems += [f"--adapters: {p}" for p in adapter_order_problems(model_dir, model_args.adapters)]
    kbits = kbits_problem(model_args.load_in_kbits)  # the model loads only after the data work
    if kbits:
        problems.append(kbits)
    inputs = [model_dir, model_args.tokenizer_name_or_path, model_args.base_tokenizer_name_or_path,
              data_args.dataset_dir, *model_args.adapters]
    # prepare_output_dir may delete output_dir (--overwrite_output_dir), and writes into it
    for path in inputs_inside(training_args.output_dir, inputs):
        problems.append(
            f"output_dir {training_args.output_dir} is (or contains) the input {path}; choose a new folder"
        )
    problems += _report_to_problems(training_args.report_to)
    if stage_args.task == "sft" and stage_args.stage == 1:
        problems.append(
            "--stage 1 (embeddings only) is for --task pt; SFT trains LoRA (and --modules_to_save)"
        )
    if stage_args.max_train_tokens is not None and stage_args.max_train_tokens < 1:
        problems.append(f"--max_train_tokens must be a positive number of tokens, got {stage_args.max_train_tokens}")
    if stage_args.max_train_tokens and training_args.max_steps > 0:
        problems.append("give either --max_train_tokens or --max_steps, not both")
    if stage_args.task == "sft" and stage_args.max_train_tokens:
        problems.append("--max_train_tokens is for --task pt (SFT sequences vary in length); use --max_steps")
    if stage_args.uses_lora and not stage_args.trainable_modules():
        problems.append("--trainable is empty: LoRA needs at least one module (e.g. q_proj,v_proj)")
    if stage_args.uses_lora and stage_args.lora_rank < 1:
        problems.append(f"--lora_rank must be at least 1, got {stage_args.lora_rank}")
    if stage_args.uses_lora and not 0 <= stage_args.lora_dropout < 1:
        problems.append(f"--lora_dropout must be in [0, 1), got {stage_args.lora_dropout}")
    if stage_args.embedding_learning_rate is not None and stage_args.embedding_learning_rate <= 0:
        problems.append(
            f"--embedding_learning_rate must be positive, got {stage_args.embedding_learning_rate} (to keep "
            "the embeddings frozen in stage 2 or SFT, leave them out of --modules_to_save)"
        )
    if stage_args.loraplus_lr_ratio < 1:
        problems.append(
            f"--loraplus_lr_ratio must be >= 1 (B learns at least as fast as A), got "
            f"{stage_args.loraplus_lr_ratio}"
        )
    if stage_args.warmup_ratio is not None:
        if not 0 <= stage_args.warmup_ratio < 1:
            problems.append(f"--warmup_ratio must be in [0, 1), got {stage_args.warmup_ratio}")
        if training_args.warmup_steps:
            problems.append("give either --warmup_ratio or --warmup_steps, not both")
    if getattr(data_args, "block_size", 2) < 2:  # the data module allows 1 (token counts); training does not
        problems.append(
            f"--block_size {data_args.block_size} must be at least 2: each token is trained to predict the next "
            "one in its block, so a block of one token has nothing to predict (the run would log loss 0)"
        )
    length = getattr(data_args, "block_size", None) or getattr(data_args, "max_seq_length", None)
    context = getattr(config, "max_position_embeddings", None)
    if length and context and length > context:
        option = "--block_size" if hasattr(data_args, "block_size") else "--max_seq_length"
        problems.append(
            f"{option} {length} is longer than the model's context ({context} positions, "
            "max_position_embeddings in its config.json)"
        )
    if config is not None:
        dtype = (
            _checkpoint_dtype(model_dir)
            if model_args.torch_dtype == "auto"
            else DTYPES[model_args.torch_dtype]
        )
        if dtype == torch.bfloat16 and training_args.fp16:
            problems.append("--fp16 with bfloat16 weights: use --bf16 (or --torch_dtype float32)")
        elif dtype == torch.float16 and training_args.bf16:
            problems.append("--bf16 with float16 weights (the original's defect): use --torch_dtype bfloat16")
        elif dtype == torch.float16 and (training_args.use_cpu or not torch.cuda.is_available()):
            # fp16 mixed precision needs CUDA; on the CPU the fp32 trained rows met fp16 activations (a traceback)
            problems.append("--torch_dtype float16 trains on GPUs only: on the CPU use bfloat16 or float32")
        elif dtype == torch.bfloat16 and not training_args.bf16:
            logger.info(
                "--torch_dtype %s: bfloat16 weights, so bf16 mixed precision is on", model_args.torch_dtype
            )
            training_args = dataclasses.replace(training_args, bf16=True)
        elif dtype == torch.float16 and not training_args.fp16:
            logger.info(
                "--torch_dtype %s: float16 weights, so fp16 mixed precision is on", model_args.torch_dtype
            )
            training_args = dataclasses.replace(training_args, fp16=True)
    if problems:
        raise YakError("invalid training options:\n  - " + "\n  - ".join(problems))
    return training_args


# ------------------------------------------------------------------------------------------------------
# Output folder, checkpoints, resume
# ------------------------------------------------------------------------------------------------------


def _checkpoints(output_dir: Path) -> list[Path]:
    found = [
        p
        for p in output_dir.glob(CHECKPOINT_PREFIX + "*")
        if p.is_dir() and p.name[len(CHECKPOINT_PREFIX) :].isdigit()
    ]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / COMPLETE_MARKER).is_file()


def _identity(model_args, stage_args, data_args, training_args) -> dict:
    """The :data:`RUN_IDENTITY` settings of this run; None for those that do not apply to it."""
    settings = {
        **dataclasses.asdict(model_args),
        **dataclasses.asdict(stage_args),
        **dataclasses.asdict(data_args),
        **training_args.to_dict(),  # enums as their values, as JSON keeps them
        "samples_per_step": samples_per_step(training_args),
    }
    if not stage_args.uses_lora:  # stage 1 (the embeddings' own rate applies to it too)
        for key in ("lora_rank", "lora_alpha", "lora_dropout", "trainable", "modules_to_save"):
            settings[key] = None
        settings["loraplus_lr_ratio"] = None
    if settings["max_steps"] > 0 or stage_args.max_train_tokens:  # the length is not in epochs
        settings["num_train_epochs"] = None
    # folders recorded as the places they name, so that a restart from another working directory (or with
    # the absolute path for a relative one) is the same run
    return {k: _same_place(settings.get(k)) if k in PATH_SETTINGS else settings.get(k) for k in RUN_IDENTITY}


def _identity_differences(previous: dict, identity: dict) -> list[str]:
    """``"key: value there, value now"`` for each setting that differs; a key that an older run file lacks is
    not a difference."""
    what = {"samples_per_step": "samples_per_step (batch size x gradient accumulation x processes)"}
    return [
        f"{what.get(k, k)}: {previous[k]!r} there, {v!r} now"
        for k, v in identity.items()
        if (_same_place(previous.get(k, v)) != _same_place(v) if k in PATH_SETTINGS else previous.get(k, v) != v)
    ]


def _same_place(value):
    """A setting as compared: an existing path as the folder or file it names (``data/pt``, ``./data/pt`` and
    its absolute path are one place; a hub model id stays as it is); lists element by element."""
    if isinstance(value, list):
        return [_same_place(v) for v in value]
    if isinstance(value, str) and value and os.path.exists(value):
        return os.path.realpath(value)
    return value


def _has_final_output(output_dir: Path) -> bool:
    return any((output_dir / name).is_file() for name in ("yak_adapter.json", "adapter_config.json"))


def prepare_output_dir(model_args, stage_args, data_args, training_args) -> str | None:
    """Claim ``output_dir`` for this run and return the checkpoint to resume from (or None).

    A folder holding another run (other settings), a finished run, or files that are not a Yak run is an
    error (``--overwrite_output_dir`` deletes a Yak run); a folder holding only the run file of a run that
    stopped before its first checkpoint is claimed. Incomplete checkpoints (no ``yak_checkpoint.json``)
    are never resumed from; the newest complete one is, unless ``--resume_from_checkpoint`` names one.
    Every rank takes the same decisions and passes the same barriers; only rank 0 changes the folder.
    """
    out = Path(training_args.output_dir)
    identity = _identity(model_args, stage_args, data_args, training_args)
    run_file = out / RUN_FILE
    _barrier(training_args)  # every rank looks at the folder before rank 0 changes it
    delete = False
    # a folder holding only the run file is a run that stopped before its first checkpoint (a wrong tokenizer,
    # bad data): nothing to keep, and the corrected command may claim it
    if out.is_dir() and {p.name for p in out.iterdir()} - {RUN_FILE}:
        if not run_file.is_file():
            raise YakError(
                f"output_dir {out} holds files that are not from a Yak run; choose an empty or new folder"
            )
        previous = json.loads(run_file.read_text(encoding="utf-8")).get("identity", {})
        diff = _identity_differences(previous, identity)
        reason = (
            "holds another run, with other settings:\n  - " + "\n  - ".join(diff)
            if diff
            else "holds a finished run"
            if _has_final_output(out)
            else None
        )
        if reason and not stage_args.overwrite_output_dir:
            ways_out = (
                "choose another --output_dir, or pass --overwrite_output_dir to delete it and start again"
            )
            raise YakError(
                f"output_dir {out} {reason}\nA resumed run keeps its data order, schedule and optimizer "
                f"state, so these settings must be as there: give them again to resume it, {ways_out}"
                if diff
                else f"output_dir {out} {reason}; {ways_out}"
            )
        delete = bool(reason)
    resume = training_args.resume_from_checkpoint
    incomplete = []
    if resume:
        if not is_complete_checkpoint(resume):
            raise YakError(
                f"--resume_from_checkpoint {resume} is not a complete checkpoint (no {COMPLETE_MARKER})"
            )
        if delete and out.resolve() in Path(resume).resolve().parents:
            raise YakError(
                f"--resume_from_checkpoint {resume} is inside output_dir {out}, which --overwrite_output_dir "
                f"would delete ({reason}); resume into the run's own settings, or copy the checkpoint out first"
            )
        kind = adapter_kind(resume)  # (a YakError for a folder in neither format)
        if kind != ("lora" if stage_args.uses_lora else "embeddings"):
            raise YakError(
                f"--resume_from_checkpoint {resume} is a checkpoint of "
                f"{'a LoRA run (stage 2 or SFT)' if kind == 'lora' else 'stage 1'}, and this run is "
                f"{'a LoRA run' if stage_args.uses_lora else 'stage 1'}; give a checkpoint of this stage"
            )
    elif out.is_dir() and not delete:
        checkpoints = _checkpoints(out)
        incomplete = [c for c in checkpoints if not is_complete_checkpoint(c)]
        complete = [c for c in checkpoints if is_complete_checkpoint(c)]
        resume = str(complete[-1]) if complete else None
    _barrier(training_args)  # every rank has decided
    if training_args.process_index == 0:
        if delete:
            logger.warning("--overwrite_output_dir: deleting %s (%s)", out, reason)
            shutil.rmtree(out)
        if incomplete:
            logger.warning(
                "removing incomplete checkpoints (interrupted while saving): %s",
                ", ".join(c.name for c in incomplete),
            )
            for c in incomplete:
                shutil.rmtree(c)
        atomic_write_json(
            run_file,
            {"identity": identity, "config": _config_dict(model_args, stage_args, data_args, training_args)},
        )
    if resume:
        logger.info("resuming from %s", resume)
    _barrier(training_args)
    return resume


def _barrier(training_args) -> None:
    if (
        training_args.world_size > 1
        and torch.distributed.is_available()
        and torch.distributed.is_initialized()
    ):
        torch.distributed.barrier()


def _leave_process_group(training_args) -> None:
    """All ranks finish together and close the process group before the interpreter exits.

    Without it a rank can exit while gloo's or NCCL's threads are still live in another, which aborts that
    rank at shutdown ("terminate called without an active exception") after a run that succeeded.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        _barrier(training_args)
        torch.distributed.destroy_process_group()


def _config_dict(*arg_objects) -> dict:
    """The options as JSON-able dicts (TrainingArguments.to_dict masks secrets such as hub_token)."""
    return {
        type(obj).__name__: obj.to_dict() if hasattr(obj, "to_dict") else dataclasses.asdict(obj)
        for obj in arg_objects
    }


# ------------------------------------------------------------------------------------------------------
# Model and optimizer
# ------------------------------------------------------------------------------------------------------


def build_model(model_args: ModelArguments, stage_args: StageArguments, tokenizer, training_args, model=None):
    """Load the base, bring the vocabulary to the tokenizer, apply earlier stages, prepare this stage.

    Without ``--adapters``, new rows are initialised from the base tokenizer's pieces; with them, the
    earlier stage's trained rows are used. Trainable weights are kept in fp32 (the optimizer's master
    copy) while frozen weights stay in ``--torch_dtype``; under DeepSpeed, DeepSpeed does that itself.

    Args:
        model: an already built base model to prepare instead of loading ``--model_name_or_path``
            (``bench/train_throughput.py`` builds one with random weights).
    """
    if model is None:
        if training_args.deepspeed:
            import deepspeed

            # ZeRO-3 partitions the weights while loading and needs DeepSpeed's communicator for that;
            # accelerate sets it up on GPUs but not on the CPU (a no-op when it is already up)
            deepspeed.init_distributed()
        model = load_base_model(
            model_args.model_name_or_path,
            dtype=model_args.torch_dtype,
            load_in_kbits=model_args.load_in_kbits,
            attn_implementation=model_args.attn_implementation,
        )
    base_rows = model.config.vocab_size
    if model_args.adapters:
        resize_for_adapters(model, tokenizer, model_args.adapters, _tokenizer_dir(model_args))
        model = apply_adapters(model, model_args.adapters)
    else:
        base_tok = load_tokenizer(model_args.base_tokenizer_name_or_path or model_args.model_name_or_path)
        resize_and_init_embeddings(model, tokenizer, base_tok)
    model.config.use_cache = False
    if stage_args.uses_lora and model.config.vocab_size != base_rows:
        # the adapter would not carry the new tokens' rows: the output could never be loaded or merged
        saved = stage_args.saved_modules()
        lost = []
        if "embed_tokens" not in saved and not model_args.adapters:  # with adapters, one brings the rows
            lost.append("embed_tokens")
        if not is_tied(model) and "lm_head" not in saved and not any(carries_lm_head(a) for a in model_args.adapters):
            lost.append("lm_head")
        if lost:
            raise YakError(
                f"the vocabulary grows from {base_rows} to {model.config.vocab_size} rows, but --modules_to_save "
                f"{stage_args.modules_to_save!r} does not train {' and '.join(lost)} and no --adapters folder "
                f"carries {'them' if len(lost) > 1 else 'it'}: the new tokens' rows would be lost. Add "
                f"{','.join(lost)} to --modules_to_save, or start from stage 1's output with --adapters"
            )
    if stage_args.uses_lora:
        model = prepare_lora(
            model,
            stage_args.lora_rank,
            stage_args.lora_alpha,
            stage_args.lora_dropout,
            stage_args.trainable_modules(),
            stage_args.saved_modules(),
        )
    else:
        prepare_stage1(model)
    if not training_args.deepspeed:
        compute_dtype = model.get_input_embeddings().weight.dtype
        for p in model.parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()  # in place on the Parameter: tied weights stay one tensor
        if compute_dtype != torch.float32:
            keep_hidden_dtype(model, compute_dtype)
    if training_args.gradient_checkpointing and not model.get_input_embeddings().weight.requires_grad:
        model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
    if model_args.compile_layers:
        compile_decoder_layers(model)
    trainable = sum(_numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(_numel(p) for p in model.parameters())
    logger.info(
        "trainable parameters: %s of %s (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total
    )
    return model


def keep_hidden_dtype(model, dtype: torch.dtype) -> None:
    """Cast the input embeddings' output to ``dtype``, the dtype of the frozen weights.

    The trained embeddings are kept in fp32 (the master copy), and an fp32 lookup would otherwise make the
    whole residual stream fp32: every norm, residual add and saved activation twice the bytes of the bf16
    model that the base was trained as and that inference runs. The cast keeps the forward what it is in the
    model's own dtype; gradients still reach the fp32 rows in fp32.
    """
    model.get_input_embeddings().register_forward_hook(lambda module, args, output: output.to(dtype))


def _numel(p: torch.nn.Parameter) -> int:
    return getattr(p, "ds_numel", p.numel())  # ZeRO-3 partitioned parameters are empty locally


def _is_embedding_param(name: str) -> bool:
    return ("embed_tokens" in name or "lm_head" in name) and "lora_" not in name


def optimizer_groups(
    model,
    args: TrainingArguments,
    loraplus_lr_ratio: float,
    embedding_learning_rate: float | None,
    decay_names: set[str],
) -> list[dict]:
    """Parameter groups: LoRA A (lr), LoRA B (lr x ratio, LoRA+), embeddings (their own lr).

    Hand-written rather than peft's ``create_loraplus_optimizer``, which puts the full embedding copies
    of ``modules_to_save`` in the A group.

    Args:
        model: the prepared model; only parameters that require grad are grouped.
        args: gives ``learning_rate`` and ``weight_decay``.
        loraplus_lr_ratio: learning rate of B over A.
        embedding_learning_rate: the embeddings' rate (None: ``learning_rate``).
        decay_names: parameters that get weight decay (the Trainer's rule: not norms, not biases).
    """
    decay = decay_names
    lr, emb_lr = args.learning_rate, embedding_learning_rate or args.learning_rate
    groups: dict[tuple[str, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        kind = "embeddings" if _is_embedding_param(name) else "lora_B" if "lora_B" in name else "lora_A"
        key = (kind, name in decay)
        group = groups.setdefault(
            key,
            {
                "params": [],
                "name": f"{kind}{'' if key[1] else '_no_decay'}",
                "lr": {"embeddings": emb_lr, "lora_B": lr * loraplus_lr_ratio}.get(kind, lr),
                "weight_decay": args.weight_decay if key[1] else 0.0,
            },
        )
        group["params"].append(p)
    for g in groups.values():
        logger.info(
            "optimizer group %-20s %12s parameters  lr %.3g  weight decay %g",
            g["name"],
            f"{sum(_numel(p) for p in g['params']):,}",
            g["lr"],
            g["weight_decay"],
        )
    return list(groups.values())


class YakTrainer(Trainer):
    """``Trainer`` with LoRA+ / embedding learning rates, the project's output formats, complete checkpoints.

    Args:
        loraplus_lr_ratio: learning rate of LoRA B over A.
        embedding_learning_rate: learning rate of the trained embeddings (None: ``learning_rate``).
        base_model_name_or_path: recorded in the stage-1 output.
    """

    def __init__(
        self,
        *args,
        loraplus_lr_ratio: float = 16.0,
        embedding_learning_rate: float | None = None,
        base_model_name_or_path: str = "",
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.loraplus_lr_ratio = loraplus_lr_ratio
        self.embedding_learning_rate = embedding_learning_rate
        self.base_model_name_or_path = base_model_name_or_path

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            model = model or self.model
            optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, model)
            groups = optimizer_groups(
                model,
                self.args,
                self.loraplus_lr_ratio,
                self.embedding_learning_rate,
                set(self.get_decay_parameter_names(model)),
            )
            self.optimizer = optimizer_cls(groups, **kwargs)
        return self.optimizer

    def _is_lora(self) -> bool:
        from peft import PeftModel

        return isinstance(self.model, PeftModel)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Write the stage's output format (docs/formats.md) and the tokenizer; rank 0 only.

        ``state_dict`` is given under ZeRO-3 (gathered by ``save_model`` on every rank).
        """
        if not self.args.should_save:
            return
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        if self._is_lora():
            # save_embedding_layers=False: the trained embeddings are already in modules_to_save;
            # peft would otherwise add copies of the base embeddings because the vocabulary was resized
            self.model.save_pretrained(
                output_dir, state_dict=state_dict, save_embedding_layers=False, safe_serialization=True
            )
        else:
            state = None
            if state_dict:
                state = {k: state_dict[k].detach().cpu().contiguous() for k in embedding_keys(self.model)}
            save_embeddings(self.model, output_dir, self.base_model_name_or_path, state=state)
        if self.processing_class is not None:
            save_tokenizer(self.processing_class, output_dir)

    def _save_checkpoint(self, model, trial) -> None:
        from transformers.trainer_utils import rotate_checkpoints

        # The Trainer deletes old checkpoints (--save_total_limit) at the end of its save, before the marker
        # below: a kill in between would leave no complete checkpoint. Rotate only once this one is complete.
        limit, self.args.save_total_limit = self.args.save_total_limit, None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        self.accelerator.wait_for_everyone()  # every rank's shards are on disk before the marker
        if self.args.should_save:
            run_dir = self._get_output_dir(trial=trial)
            folder = Path(run_dir) / f"{CHECKPOINT_PREFIX}{self.state.global_step}"
            atomic_write_json(
                folder / COMPLETE_MARKER, {"global_step": self.state.global_step, "complete": True}
            )
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Restore the trained weights from a checkpoint in the project's format (non-DeepSpeed runs)."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        model = model or self.model
        if self._is_lora():
            state = load_file(os.path.join(resume_from_checkpoint, "adapter_model.safetensors"))
            result = set_peft_model_state_dict(model, state)
            if result.unexpected_keys:
                raise YakError(
                    f"checkpoint {resume_from_checkpoint} does not fit the model: unexpected "
                    f"{result.unexpected_keys[:5]}"
                )
        else:
            load_embeddings(model, resume_from_checkpoint)


# ------------------------------------------------------------------------------------------------------
# Schedule
# ------------------------------------------------------------------------------------------------------


def samples_per_step(training_args: TrainingArguments) -> int:
    """Samples per optimizer step: batch size x gradient accumulation x processes."""
    return (
        training_args.per_device_train_batch_size
        * training_args.gradient_accumulation_steps
        * training_args.world_size
    )


def resolve_schedule(
    training_args: TrainingArguments, stage_args: StageArguments, n_train: int, tokens_per_sample: int
):
    """Fix the number of steps and the warm-up in steps; refuse schedules that cannot be what was meant.

    The original's ``--num_train_epochs 100000 --warmup_ratio 0.05`` puts the end of warm-up 5,000 epochs
    away: the learning rate never leaves warm-up. A warm-up longer than one epoch of a run whose length
    comes from ``--num_train_epochs`` is refused, with the numbers.

    Returns:
        ``(training_args, summary)``: the arguments with ``max_steps`` (token budget) and integer
        ``warmup_steps`` set, and a dict of the resolved numbers.
    """
    per_step = samples_per_step(training_args)
    batches = math.ceil(n_train / (training_args.per_device_train_batch_size * training_args.world_size))
    # as the Trainer counts: a last, shorter accumulation of an epoch is a step too
    steps_per_epoch = max(math.ceil(batches / training_args.gradient_accumulation_steps), 1)
    changes = {}
    if stage_args.max_train_tokens:
        changes["max_steps"] = math.ceil(stage_args.max_train_tokens / (per_step * tokens_per_sample))
    max_steps = changes.get("max_steps", training_args.max_steps)
    by_epochs = max_steps <= 0
    total = math.ceil(training_args.num_train_epochs * steps_per_epoch) if by_epochs else max_steps
    if stage_args.warmup_ratio is not None:
        changes["warmup_steps"] = math.ceil(stage_args.warmup_ratio * total)
    warmup = changes.get("warmup_steps", training_args.get_warmup_steps(total))
    if warmup >= total:
        raise YakError(
            f"the warm-up ({warmup:,} steps) is not shorter than the whole run ({total:,} steps): "
            "the learning rate would never reach --learning_rate; lower --warmup_steps"
        )
    if by_epochs and warmup > steps_per_epoch:
        raise YakError(
            f"--num_train_epochs {training_args.num_train_epochs:g} gives {total:,} steps ({steps_per_epoch:,} "
            f"per epoch: {n_train:,} samples, {per_step} per step), so the warm-up lasts {warmup:,} steps = "
            f"{warmup / steps_per_epoch:,.1f} epochs and the learning rate would stay in warm-up for most of "
            "any real run. Set the length with --max_steps or --max_train_tokens and the warm-up in steps "
            "(e.g. --warmup_steps 100)."
        )
    if by_epochs and training_args.num_train_epochs > 10:
        logger.warning(
            "the learning-rate schedule spans %s steps (%g epochs); if you stop earlier the decay "
            "never happens: set --max_steps or --max_train_tokens",
            f"{total:,}",
            training_args.num_train_epochs,
        )
    if changes:
        training_args = dataclasses.replace(training_args, **changes)
    summary = {
        "steps": total,
        "steps_per_epoch": steps_per_epoch,
        "epochs": total / steps_per_epoch,
        "warmup_steps": warmup,
        "samples_per_step": per_step,
        "tokens_per_step": per_step * tokens_per_sample,
        "tokens": total * per_step * tokens_per_sample,
    }
    logger.info(
        "schedule: %s steps (%.2f epochs of %s steps), warm-up %s steps, %s samples = up to %s tokens "
        "per step, up to %s tokens in all, %s schedule",
        f"{total:,}",
        summary["epochs"],
        f"{steps_per_epoch:,}",
        f"{warmup:,}",
        per_step,
        f"{summary['tokens_per_step']:,}",
        f"{summary['tokens']:,}",
        getattr(training_args.lr_scheduler_type, "value", training_args.lr_scheduler_type),
    )
    return training_args, summary


# ------------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------------


def collate_blocks(features: list[dict]) -> dict:
    """Stack equal-length pretraining blocks; labels are the inputs (the model shifts them).

    Hand-written because ``DataCollatorForLanguageModeling`` needs a pad token, which Llama's tokenizer
    lacks, and blocks never need padding.
    """
    input_ids = torch.tensor([f["input_ids"] for f in features], dtype=torch.long)  # (B, T)
    return {"input_ids": input_ids, "labels": input_ids.clone()}


def build_datasets(stage_args: StageArguments, data_args, tokenizer, training_args):
    """The task's datasets and collator; the main process builds the cache first, the others load it."""
    with training_args.main_process_first(local=False, desc="building the datasets"):
        if stage_args.task == "sft":
            from yak.sft import SFTDataCollator, build_sft_datasets

            return build_sft_datasets(tokenizer, data_args, seed=training_args.seed), SFTDataCollator(
                tokenizer
            )
        from yak.data import build_pretraining_datasets

        return build_pretraining_datasets(tokenizer, data_args, seed=training_args.seed), collate_blocks


# ------------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------------


def plot_losses(log_history: list[dict], path: str | os.PathLike) -> None:
    """Training (and validation) loss against the step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="training loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _summary_table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


# ------------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------------


def _save_final(trainer: YakTrainer, output_dir: str) -> None:
    """Write the final output into ``output_dir`` through a temporary folder; the descriptor moves last."""
    tmp = Path(output_dir) / FINAL_TMP
    trainer.save_model(str(tmp))
    if trainer.args.should_save:
        last = ("yak_adapter.json", "adapter_config.json")
        for f in sorted(tmp.iterdir(), key=lambda f: f.name in last):
            os.replace(f, Path(output_dir) / f.name)
        tmp.rmdir()
    trainer.accelerator.wait_for_everyone()


def train_on_datasets(
    model_args: ModelArguments,
    stage_args: StageArguments,
    training_args: TrainingArguments,
    tokenizer,
    datasets,
    data_collator,
    resume_from_checkpoint: str | None = None,
    tokens_per_sample: int | None = None,
    callbacks: Sequence[TrainerCallback] = (),
) -> dict:
    """Load and prepare the model, fix the schedule, train, save the output; return the summary.

    Args:
        model_args, stage_args, training_args: the checked options.
        tokenizer: the (merged) tokenizer; saved with every checkpoint.
        datasets: ``DatasetDict`` with ``train`` and optionally ``validation``.
        data_collator: makes batches of the datasets' rows.
        resume_from_checkpoint: a complete checkpoint folder, or None.
        tokens_per_sample: tokens per row for the token counts (default: the first row's length).
        callbacks: extra ``TrainerCallback`` objects.
    """
    from transformers import set_seed

    train_ds, eval_ds = datasets["train"], datasets.get("validation")
    eval_ds = eval_ds if eval_ds is not None and len(eval_ds) else None
    if eval_ds is None and training_args.eval_strategy != "no":
        raise YakError(
            f"--eval_strategy {training_args.eval_strategy.value} needs validation data, and the validation "
            "split is empty: raise --validation_split_percentage above 0, or pass --eval_strategy no"
        )
    set_seed(training_args.seed)  # LoRA's A matrices are initialised at random: same seed, same run
    model = build_model(model_args, stage_args, tokenizer, training_args)
    tokens_per_sample = tokens_per_sample or len(train_ds[0]["input_ids"])
    training_args, schedule = resolve_schedule(training_args, stage_args, len(train_ds), tokens_per_sample)
    trainer = YakTrainer(
        model=model,
        args=training_args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=data_collator,
        processing_class=tokenizer,
        callbacks=list(callbacks),
        loraplus_lr_ratio=stage_args.loraplus_lr_ratio if stage_args.uses_lora else 1.0,
        embedding_learning_rate=stage_args.embedding_learning_rate,
        base_model_name_or_path=model_args.model_name_or_path,
    )
    result = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    _save_final(trainer, training_args.output_dir)
    metrics = dict(result.metrics)
    if eval_ds is not None:
        metrics.update(trainer.evaluate())
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    summary = {
        **schedule,
        "global_step": trainer.state.global_step,
        "losses": losses,
        "train_loss": metrics.get("train_loss"),
        "eval_loss": metrics.get("eval_loss"),
        "train_runtime": metrics.get("train_runtime"),
        "tokens_per_second": (
            trainer.state.global_step
            * schedule["tokens_per_step"]
            / max(metrics.get("train_runtime", 0.0), 1e-9)
        ),
    }
    if trainer.args.should_save:
        if stage_args.plot_loss:
            plot_losses(trainer.state.log_history, Path(training_args.output_dir) / "loss.png")
        rows = [
            ("task / stage", f"{stage_args.task} / {stage_args.stage if stage_args.task == 'pt' else '-'}"),
            ("steps", f"{trainer.state.global_step:,}"),
            ("first / last logged loss", f"{losses[0]:.4f} / {losses[-1]:.4f}" if losses else "-"),
            (
                "validation loss",
                f"{summary['eval_loss']:.4f} (perplexity {math.exp(min(summary['eval_loss'], 50)):.2f})"
                if summary["eval_loss"] is not None
                else "-",
            ),
            ("time", f"{summary['train_runtime'] or 0:.1f} s"),
            ("throughput", f"{summary['tokens_per_second']:,.0f} tokens/s (up to)"),
            ("output", training_args.output_dir),
        ]
        logger.info("training done:\n%s", _summary_table(rows))
    return summary


def run_training(
    model_args: ModelArguments,
    stage_args: StageArguments,
    data_args,
    training_args: TrainingArguments,
    callbacks: Sequence[TrainerCallback] = (),
) -> dict:
    """The whole run: check, claim output_dir, tokenizer, datasets, model, train, save. Returns the summary."""
    training_args = check_args(model_args, stage_args, data_args, training_args)
    logger.info(
        "configuration:\n%s",
        json.dumps(_config_dict(model_args, stage_args, data_args, training_args), indent=1, default=str),
    )
    resume = prepare_output_dir(model_args, stage_args, data_args, training_args)
    tokenizer = load_tokenizer(_tokenizer_dir(model_args))
    if not model_args.adapters:  # a tokenizer that does not extend the model's fails before the data work
        base_dir = model_args.base_tokenizer_name_or_path or model_args.model_name_or_path
        check_tokenizer_extends(tokenizer, load_tokenizer(base_dir), _tokenizer_dir(model_args), base_dir)
    datasets, collator = build_datasets(stage_args, data_args, tokenizer, training_args)
    summary = train_on_datasets(
        model_args,
        stage_args,
        training_args,
        tokenizer,
        datasets,
        collator,
        resume_from_checkpoint=resume,
        tokens_per_sample=getattr(data_args, "block_size", None)
        or getattr(data_args, "max_seq_length", None),
        callbacks=callbacks,
    )
    _leave_process_group(training_args)
    return summary


def _tokenizer_dir(model_args: ModelArguments) -> str:
    """The tokenizer: --tokenizer_name_or_path, else the last adapter folder with one, else the model's."""
    from yak.modeling import has_tokenizer

    if model_args.tokenizer_name_or_path:
        return model_args.tokenizer_name_or_path
    with_tokenizer = [a for a in model_args.adapters if has_tokenizer(a)]
    return with_tokenizer[-1] if with_tokenizer else model_args.model_name_or_path
