"""Training: continued pretraining (stage 1: embeddings; stage 2: LoRA+ and embeddings) and SFT.

One run reads top to bottom in :func:`run_training`: check the options, load the tokenizer, claim the output
folder (or find the checkpoint to resume), build the datasets, load and prepare the model, fix the schedule,
build the trainer, train, save, report. The output folder is locked for the run and every file written there
is recorded in its manifest (:mod:`yak.outdir`).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import TrainerCallback, TrainingArguments

from yak import YakError
from yak.formats import base_record, require_adapters_fit
from yak.modeling import check_tokenizer_extends
from yak.outdir import Claim
from yak.safe_load import check_pickles, guard_deepspeed
from yak.source import ModelSource
from yak.tokenizer import load_tokenizer
from yak.training.arguments import StageArguments, _config_dict, check_args
from yak.training.model import build_model
from yak.training.report import _summary_table, plot_losses
from yak.training.run_folder import _leave_process_group, abandon_if_empty, prepare_output_dir
from yak.training.schedule import resolve_schedule
from yak.training.trainer import YakTrainer

logger = logging.getLogger(__name__)

FINAL_TMP = ".final.tmp"


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


def _save_final(trainer: YakTrainer, output_dir: str) -> None:
    """Write the final output into ``output_dir`` through a temporary folder; the descriptor moves last.

    Every file is recorded in the folder's manifest before it is written (whatever the save writes: the
    stage's format, the tokenizer, records added to it).
    """
    tmp = Path(output_dir) / FINAL_TMP
    trainer._record(tmp.parent, f"{FINAL_TMP}/")
    with trainer._writing(tmp):
        trainer.save_model(str(tmp))
    if trainer.args.should_save:
        last = ("yak_adapter.json", "adapter_config.json")
        for f in sorted(tmp.iterdir(), key=lambda f: f.name in last):
            trainer._record(tmp.parent, f.name)
            os.replace(f, Path(output_dir) / f.name)
        tmp.rmdir()
        if trainer.claim is not None:
            trainer.claim.forget(f"{FINAL_TMP}/")
    trainer.accelerator.wait_for_everyone()


def train_on_datasets(
    source: ModelSource,
    stage_args: StageArguments,
    training_args: TrainingArguments,
    tokenizer,
    datasets,
    data_collator,
    resume_from_checkpoint: str | None = None,
    tokens_per_sample: int | None = None,
    callbacks: Sequence[TrainerCallback] = (),
    claim: Claim | None = None,
) -> dict:
    """Load and prepare the model, fix the schedule, train, save the output; return the summary.

    Args:
        source, stage_args, training_args: the checked options.
        tokenizer: the (merged) tokenizer; saved with every checkpoint.
        datasets: ``DatasetDict`` with ``train`` and optionally ``validation``.
        data_collator: makes batches of the datasets' rows.
        resume_from_checkpoint: a complete checkpoint folder, or None.
        tokens_per_sample: tokens per row for the token counts (default: the first row's length).
        callbacks: extra ``TrainerCallback`` objects.
        claim: the output folder's claim (rank 0), which records every file written there.
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
    model = build_model(source, stage_args, tokenizer, training_args)
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
        base_model_name_or_path=source.base_model,
        base_record=_base_record(source, stage_args, training_args),
        save_safetensors=stage_args.save_safetensors,
        claim=claim,
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
            trainer._record(Path(training_args.output_dir), "loss.png")
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


def _base_record(source: ModelSource, stage_args: StageArguments, training_args: TrainingArguments) -> dict | None:
    """What the outputs record as their base (yak_base.json); computed on the process that saves."""
    if not training_args.should_save:
        return None
    base_tok = stage_args.base_tokenizer_name_or_path
    return base_record(source.base_model, load_tokenizer(base_tok) if base_tok else None)


def run_training(
    source: ModelSource,
    stage_args: StageArguments,
    data_args,
    training_args: TrainingArguments,
    callbacks: Sequence[TrainerCallback] = (),
) -> dict:
    """The whole run: check, tokenizer, claim output_dir, datasets, model, train, save. Returns the summary.

    A run that fails before its first checkpoint removes what it wrote in output_dir.
    """
    training_args = check_args(source, stage_args, data_args, training_args)
    logger.info(
        "configuration:\n%s",
        json.dumps(_config_dict(source, stage_args, data_args, training_args), indent=1, default=str),
    )
    tok_dir = source.tokenizer_dir()
    tokenizer = load_tokenizer(tok_dir)
    if not source.adapters:  # a tokenizer that does not extend the model's fails before the folder changes
        base_dir = stage_args.base_tokenizer_name_or_path or source.base_model
        check_tokenizer_extends(tokenizer, load_tokenizer(base_dir), tok_dir, base_dir)
    resume, claim = prepare_output_dir(source, stage_args, data_args, training_args)
    try:
        if resume:  # before anything is loaded: no code from a planted pickle, no checkpoint of another base
            check_pickles(resume)
            require_adapters_fit(source.base_model, [resume])
        if training_args.deepspeed:
            guard_deepspeed()  # DeepSpeed would unpickle its states in full
        datasets, collator = build_datasets(stage_args, data_args, tokenizer, training_args)
        summary = train_on_datasets(
            source,
            stage_args,
            training_args,
            tokenizer,
            datasets,
            collator,
            resume_from_checkpoint=resume,
            tokens_per_sample=getattr(data_args, "block_size", None)
            or getattr(data_args, "max_seq_length", None),
            callbacks=callbacks,
            claim=claim,
        )
    except BaseException:
        abandon_if_empty(claim)  # a run that failed early leaves no run file, as if a run were there
        raise
    finally:
        if claim is not None:
            claim.release()
    _leave_process_group(training_args)
    return summary
