"""The run's length and warm-up in optimizer steps, fixed before the trainer starts."""

from __future__ import annotations

import dataclasses
import logging
import math

from transformers import TrainingArguments

from yak import YakError
from yak.training.arguments import StageArguments

logger = logging.getLogger(__name__)


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
