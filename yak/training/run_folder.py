"""The output folder of a run: its identity (yak_run.json), its checkpoints, and the decision to resume.

An output folder holds one run. Its :data:`RUN_IDENTITY` settings are recorded when it is claimed; a later
command with other settings is refused (or, with ``--overwrite_output_dir``, starts again), one with the same
settings resumes from the newest checkpoint that is complete (its ``yak_checkpoint.json`` is written last).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path

import torch

from yak import YakError
from yak.formats import RUN_FILE, adapter_kind
from yak.io import atomic_write_json
from yak.outdir import MANIFEST, Claim, foreign_files, listed, read_manifest
from yak.source import ModelSource
from yak.training.arguments import _config_dict
from yak.training.schedule import samples_per_step

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
COMPLETE_MARKER = "yak_checkpoint.json"  # written last: a checkpoint without it is incomplete


# The settings that define a run, recorded in its yak_run.json: an output folder whose run differs in any of
# them holds another run. Resuming promises the run it continues (the same data in the same order, the same
# schedule and optimizer steps), so these are what is trained on top of what, the data and its order, the
# length, and the optimizer. Speed, memory, precision, logging, saving and evaluation settings are not in it:
# they may change between restarts (e.g. on other hardware).
RUN_IDENTITY = (
    # what is trained, on top of what
    "task", "stage", "base_model", "tokenizer_path", "new_rows_init", "adapters",
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
PATH_SETTINGS = ("base_model", "tokenizer_path", "adapters", "dataset_dir")


def _checkpoints(output_dir: Path) -> list[Path]:
    found = [
        p
        for p in output_dir.glob(CHECKPOINT_PREFIX + "*")
        if p.is_dir() and p.name[len(CHECKPOINT_PREFIX) :].isdigit()
    ]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / COMPLETE_MARKER).is_file()


def _identity(source, stage_args, data_args, training_args) -> dict:
    """The :data:`RUN_IDENTITY` settings of this run; None for those that do not apply to it."""
    settings = {
        **dataclasses.asdict(source),
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


def has_final_output(output_dir: Path) -> bool:
    """Whether ``output_dir`` holds a finished run: its final descriptor is written last (``_save_final``)."""
    return any((output_dir / name).is_file() for name in ("yak_adapter.json", "adapter_config.json"))


def prepare_output_dir(source, stage_args, data_args, training_args) -> tuple[str | None, Claim | None]:
    """Claim ``output_dir`` for this run; return the checkpoint to resume from (or None) and the claim.

    The folder is locked for the run (a second run on it is refused, naming the process that holds it). A
    folder holding another run (other settings), a finished run, or files that are not a Yak run is an error;
    ``--overwrite_output_dir`` deletes a Yak run's own files (its manifest) and refuses a folder that holds
    anything else, naming it. A folder holding only the run file of a run that stopped before its first
    checkpoint is claimed. Incomplete checkpoints (no ``yak_checkpoint.json``) are never resumed from; the
    newest complete one is, unless ``--resume_from_checkpoint`` names one. Every rank takes the same decisions
    and passes the same barriers; only rank 0 holds the claim (other ranks get None) and changes the folder.
    """
    out = Path(training_args.output_dir)
    identity = _identity(source, stage_args, data_args, training_args)
    run_file = out / RUN_FILE
    claim = Claim.take(out) if training_args.process_index == 0 else None
    try:
        _barrier(training_args)  # every rank looks at the folder once rank 0 holds it, before it changes it
        resume, delete, incomplete, reason = _decide(out, identity, stage_args, training_args)
        _barrier(training_args)  # every rank has decided
        if claim is not None:
            if delete:
                logger.warning("--overwrite_output_dir: deleting the files Yak wrote in %s (%s)", out, reason)
                claim.delete_own()
            if incomplete:
                logger.warning(
                    "removing incomplete checkpoints (interrupted while saving): %s",
                    ", ".join(c.name for c in incomplete),
                )
                for c in incomplete:
                    shutil.rmtree(c)
                claim.forget(*(f"{c.name}/" for c in incomplete))
            claim.record(RUN_FILE)
            atomic_write_json(
                run_file,
                {"identity": identity, "config": _config_dict(source, stage_args, data_args, training_args)},
            )
    except BaseException:
        if claim is not None:
            claim.release()
        raise
    if resume:
        logger.info("resuming from %s", resume)
    _barrier(training_args)
    return resume, claim


def _decide(out: Path, identity: dict, stage_args, training_args):
    """``(checkpoint to resume, delete the folder's run, incomplete checkpoints to remove, why delete)``."""
    delete, reason = False, None
    # a folder holding only the run file is a run that stopped before its first checkpoint (killed): nothing
    # to keep, and the corrected command may claim it
    if out.is_dir() and {p.name for p in out.iterdir()} - {RUN_FILE, MANIFEST}:
        if not (out / RUN_FILE).is_file():
            raise YakError(
                f"output_dir {out} holds files that are not from a Yak run ({listed(foreign_files(out))}); "
                "choose an empty or new folder"
            )
        previous = json.loads((out / RUN_FILE).read_text(encoding="utf-8")).get("identity", {})
        # a run file of an older version names the model options by the original flags
        previous = {ModelSource.renamed().get(k, k): v for k, v in previous.items()}
        diff = _identity_differences(previous, identity)
        reason = (
            "holds another run, with other settings:\n  - " + "\n  - ".join(diff)
            if diff
            else "holds a finished run"
            if has_final_output(out)
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
    foreign = foreign_files(out) if out.is_dir() else []
    if delete and foreign:
        raise YakError(
            f"output_dir {out} {reason.splitlines()[0].rstrip(':')}, and holds files that Yak did not write: "
            f"{listed(foreign)}; --overwrite_output_dir deletes only what Yak wrote there (listed in {MANIFEST}), "
            "so move those files out or choose another folder"
        )
    strays = [c.name for c in incomplete if f"{c.name}/" not in read_manifest(out)]
    if strays:
        raise YakError(
            f"output_dir {out} holds {', '.join(strays)}: incomplete checkpoints that Yak did not record writing "
            "(a run of an older version, or copied in); delete them or choose another folder"
        )
    return resume, delete, incomplete, reason


def abandon_if_empty(claim: Claim | None) -> None:
    """After a failed run: when the folder holds no complete checkpoint and no final output, remove what the
    run wrote (its run file, half-written checkpoints) and the folder if that empties it, so that it does not
    look like a run."""
    if claim is None or not claim.folder.is_dir():
        return
    if has_final_output(claim.folder) or any(is_complete_checkpoint(c) for c in _checkpoints(claim.folder)):
        return
    logger.info("the run stopped before its first checkpoint: removing what it wrote in %s", claim.folder)
    claim.delete_own()


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
