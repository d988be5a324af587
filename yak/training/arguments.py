"""The options of a training run: the stage's own options, the parse, and the up-front checks."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import TrainingArguments

from yak import YakError
from yak.cli import parse_args
from yak.formats import DTYPES, check_tokenizer_files
from yak.modeling import NEW_ROWS_INIT, kbits_problem
from yak.outdir import inputs_inside
from yak.source import ModelSource

logger = logging.getLogger(__name__)

DESCRIPTION = (
    "Continued pretraining (--task pt; --stage 1 trains the embeddings only, --stage 2 adds LoRA+ adapters "
    "and keeps training the embeddings) and instruction tuning (--task sft, LoRA+) of a Llama-2-family model "
    "with a merged tokenizer. Options come from the command line or one JSON/YAML file; every "
    "transformers TrainingArguments option is accepted (run under torchrun and --deepspeed for several "
    "GPUs). Checkpoints are resumed automatically from output_dir. See docs/training.md."
)


@dataclass
class StageArguments:
    """What is trained, with which learning rates, for how long, and how the base model is loaded for it
    (which model: :class:`yak.source.ModelSource`)."""

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
            "help": "Delete the run in an output_dir that holds a run with other settings (or a finished run) "
            "and start again: only the files Yak wrote there (its manifest); a folder holding anything else is "
            "refused. Without it such a folder is an error."
        },
    )
    save_safetensors: bool = field(
        default=True,
        metadata={
            "help": "False: write the trained weights (outputs and checkpoints) as PyTorch .bin files, a "
            "torch.save of the state dict, as the original project did; every reader loads them with "
            "weights_only=True (no code runs). True: safetensors."
        },
    )
    plot_loss: bool = field(
        default=True, metadata={"help": "Write loss.png (training/validation loss) at the end."}
    )
    base_tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "The base model's original tokenizer, used to initialise each new embedding row as the "
            "mean of the vectors of the pieces it splits the new token into; default: the --base_model folder's."
        },
    )
    new_rows_init: str = field(
        default="mean",
        metadata={
            "help": "Initialisation of the new tokens' embedding rows: mean (of the vectors of the pieces the "
            "base tokenizer splits each new token into) or random (normal with the model's "
            "initializer_range, what the original project got; for ablations).",
            "choices": list(NEW_ROWS_INIT),
        },
    )
    load_in_kbits: int = field(
        default=16,
        metadata={
            "help": "Load the frozen base weights in 4 or 8 bits (needs bitsandbytes and a GPU); 16 = off.",
            "choices": [4, 8, 16],
        },
    )
    attn_implementation: str = field(
        default="sdpa",
        metadata={"help": "Attention implementation passed to transformers (sdpa, eager, ...)."},
    )
    compile_layers: bool = field(
        default=False,
        metadata={
            "help": "Compile each decoder layer with torch.compile (regional compilation: one compile, "
            "reused by every layer). On GPUs, with --gradient_checkpointing off, it made LoRA CPT of a "
            "7B-shaped model about 1.9x faster than the naive setup (bench/RESULTS.md); costs about a "
            "minute of compilation at start."
        },
    )

    def trainable_modules(self) -> list[str]:
        return [m.strip() for m in self.trainable.split(",") if m.strip()]

    def saved_modules(self) -> list[str]:
        return [m.strip() for m in self.modules_to_save.split(",") if m.strip()]

    @property
    def uses_lora(self) -> bool:
        return self.task == "sft" or self.stage == 2


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
    """Parse ``(ModelSource, StageArguments, data arguments, TrainingArguments)``.

    The data arguments are ``yak.data.DataArguments`` for ``--task pt`` and ``yak.sft.SFTDataArguments``
    for ``--task sft``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    task = _peek_task(argv)
    if task not in ("pt", "sft"):
        raise YakError(f"--task must be pt or sft, got {task!r}")
    classes = [ModelSource, StageArguments, _data_arguments_class(task), TrainingArguments]
    return parse_args(classes, argv, description=DESCRIPTION)


def _checkpoint_dtype(model_dir: str) -> torch.dtype:
    from transformers import AutoConfig

    dtype = getattr(AutoConfig.from_pretrained(model_dir, trust_remote_code=False), "dtype", None)
    if isinstance(dtype, str):
        dtype = DTYPES.get(dtype)
    return dtype or torch.float32


def liger_problem(compile_layers: bool, training_args: TrainingArguments) -> str | None:
    """Why ``--use_liger_kernel`` cannot go with ``--compile_layers`` as configured, or None.

    Liger's RMSNorm kernels fail to compile inside the compiled decoder layers (on an H100, torch 2.11: a
    Triton ``CompilationError``, ``'float' object has no attribute 'to'`` at ``eps.to(tl.float32)``, issue 15),
    and the run was slower than compilation alone; its other kernels (e.g. the fused linear cross-entropy,
    outside the layers) are not refused.
    """
    config = training_args.liger_kernel_config or {}
    if not (compile_layers and training_args.use_liger_kernel and config.get("rms_norm", True)):
        return None
    return (
        "--use_liger_kernel with --compile_layers: Liger's RMSNorm kernels fail to compile inside the compiled "
        'layers (issue 15). Turn them off with liger_kernel_config {"rms_norm": false} (in a JSON/YAML options '
        "file), or leave out --compile_layers or --use_liger_kernel"
    )


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


def check_args(source: ModelSource, stage_args: StageArguments, data_args, training_args):
    """Check every option up front; raise one :class:`YakError` listing all problems.

    Returns:
        ``training_args``, with mixed precision switched on to match ``--dtype`` (one dtype option:
        bfloat16 weights train under bf16 autocast, float16 under fp16).
    """
    from transformers import AutoConfig

    problems = source.problems()
    model_dir = source.base_model
    config = None
    if model_dir and (Path(model_dir) / "config.json").is_file():
        try:
            config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
        except (OSError, ValueError):  # a broken config.json: reported by source.problems()
            config = None
    base_tok = stage_args.base_tokenizer_name_or_path
    if base_tok and not Path(base_tok).is_dir():
        problems.append(f"--base_tokenizer_name_or_path {base_tok} is not a folder")
    elif base_tok:
        try:
            check_tokenizer_files(base_tok)
        except YakError as e:
            problems.append(f"--base_tokenizer_name_or_path: {e}")
    if source.adapters and stage_args.new_rows_init != "mean":
        problems.append(
            f"--new_rows_init {stage_args.new_rows_init} initialises new rows of a base model; with --adapters "
            "the rows come from the earlier stage: leave it out"
        )
    kbits = kbits_problem(stage_args.load_in_kbits)  # the model loads only after the data work
    if kbits:
        problems.append(kbits)
    inputs = [model_dir, source.tokenizer_path, base_tok, data_args.dataset_dir, *source.adapters]
    # prepare_output_dir may delete the run in output_dir (--overwrite_output_dir), and writes into it
    for path in inputs_inside(training_args.output_dir, inputs):
        problems.append(
            f"output_dir {training_args.output_dir} is (or contains) the input {path}; choose a new folder"
        )
    problems += _report_to_problems(training_args.report_to)
    liger = liger_problem(stage_args.compile_layers, training_args)
    if liger:
        problems.append(liger)
    if stage_args.task == "pt":  # SFT's data options are checked as they are parsed
        from yak.data import option_problems

        problems += option_problems(data_args)
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
    if getattr(data_args, "block_size", 2) == 1:  # the data module allows 1 (token counts); training does not
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
        dtype = _checkpoint_dtype(model_dir) if source.dtype == "auto" else DTYPES[source.dtype]
        if dtype == torch.bfloat16 and training_args.fp16:
            problems.append("--fp16 with bfloat16 weights: use --bf16 (or --dtype float32)")
        elif dtype == torch.float16 and training_args.bf16:
            problems.append("--bf16 with float16 weights (the original's defect): use --dtype bfloat16")
        elif dtype == torch.float16 and (training_args.use_cpu or not torch.cuda.is_available()):
            # fp16 mixed precision needs CUDA; on the CPU the fp32 trained rows met fp16 activations (a traceback)
            problems.append("--dtype float16 trains on GPUs only: on the CPU use bfloat16 or float32")
        elif dtype == torch.bfloat16 and not training_args.bf16:
            logger.info("--dtype %s: bfloat16 weights, so bf16 mixed precision is on", source.dtype)
            training_args = dataclasses.replace(training_args, bf16=True)
        elif dtype == torch.float16 and not training_args.fp16:
            logger.info("--dtype %s: float16 weights, so fp16 mixed precision is on", source.dtype)
            training_args = dataclasses.replace(training_args, fp16=True)
    if problems:
        raise YakError("invalid training options:\n  - " + "\n  - ".join(problems))
    return training_args


def _config_dict(*arg_objects) -> dict:
    """The options as JSON-able dicts (TrainingArguments.to_dict masks secrets such as hub_token)."""
    return {
        type(obj).__name__: obj.to_dict() if hasattr(obj, "to_dict") else dataclasses.asdict(obj)
        for obj in arg_objects
    }
