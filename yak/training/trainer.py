"""``YakTrainer``: a ``transformers.Trainer`` with the LoRA+ / embedding parameter groups, the project's
output formats (docs/formats.md), and checkpoints that count only once complete."""

from __future__ import annotations

import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from transformers import Trainer, TrainingArguments

from yak import YakError
from yak.formats import ADAPTER_WEIGHTS, BASE_FILE, read_weights, weights_in
from yak.io import atomic_write_json
from yak.modeling import embedding_keys, load_embeddings, save_embeddings
from yak.outdir import Claim, write_error
from yak.tokenizer import save_tokenizer
from yak.training.model import _numel
from yak.training.run_folder import CHECKPOINT_PREFIX, COMPLETE_MARKER

logger = logging.getLogger(__name__)


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
        base_record: the base's identity, written as ``yak_base.json`` into every output and checkpoint.
        save_safetensors: False writes PyTorch ``.bin`` weights (``--save_safetensors False``).
        claim: the output folder's :class:`~yak.outdir.Claim` (rank 0; None elsewhere), which records every
            checkpoint before it is written.
    """

    def __init__(
        self,
        *args,
        loraplus_lr_ratio: float = 16.0,
        embedding_learning_rate: float | None = None,
        base_model_name_or_path: str = "",
        base_record: dict | None = None,
        save_safetensors: bool = True,
        claim: Claim | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.save_safetensors = save_safetensors
        self.claim = claim
        self.loraplus_lr_ratio = loraplus_lr_ratio
        self.embedding_learning_rate = embedding_learning_rate
        self.base_model_name_or_path = base_model_name_or_path
        self.base_record = base_record

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
                output_dir,
                state_dict=state_dict,
                save_embedding_layers=False,
                safe_serialization=self.save_safetensors,
            )
        else:
            state = None
            if state_dict:
                state = {k: state_dict[k].detach().cpu().contiguous() for k in embedding_keys(self.model)}
            save_embeddings(
                self.model, output_dir, self.base_model_name_or_path, state=state, safetensors=self.save_safetensors
            )
        if self.processing_class is not None:
            save_tokenizer(self.processing_class, output_dir)
        if self.base_record is not None:
            atomic_write_json(Path(output_dir) / BASE_FILE, self.base_record)

    def _save_checkpoint(self, model, trial) -> None:
        from transformers.trainer_utils import rotate_checkpoints

        run_dir = Path(self._get_output_dir(trial=trial))
        folder = run_dir / f"{CHECKPOINT_PREFIX}{self.state.global_step}"
        self._record(run_dir, f"{folder.name}/")
        # The Trainer deletes old checkpoints (--save_total_limit) at the end of its save, before the marker
        # below: a kill in between would leave no complete checkpoint. Rotate only once this one is complete.
        limit, self.args.save_total_limit = self.args.save_total_limit, None
        try:
            with self._writing(folder):
                super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        self.accelerator.wait_for_everyone()  # every rank's shards are on disk before the marker
        if self.args.should_save:
            with self._writing(folder):
                atomic_write_json(
                    folder / COMPLETE_MARKER, {"global_step": self.state.global_step, "complete": True}
                )
            before = {p.name for p in run_dir.glob(f"{CHECKPOINT_PREFIX}*")}
            rotate_checkpoints(
                output_dir=str(run_dir),
                save_total_limit=limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )
            if self.claim is not None and run_dir == self.claim.folder:
                self.claim.forget(*(f"{name}/" for name in before - {p.name for p in run_dir.iterdir()}))

    def _record(self, folder: Path, name: str) -> None:
        """Record ``name`` in the output folder's manifest before it is written there (rank 0)."""
        if self.claim is not None and self.args.should_save and folder == self.claim.folder:
            self.claim.record(name)

    @contextmanager
    def _writing(self, path: Path):
        """A disk-full or permission error while writing ``path`` (a checkpoint or the final output) ends in
        one line naming it (:func:`yak.outdir.write_error`), and the half-written folder is removed."""
        try:
            yield
        except Exception as e:
            error = write_error(path, e)
            if error is None:
                raise
            if self.args.should_save:
                shutil.rmtree(path, ignore_errors=True)
                if self.claim is not None and path.parent == self.claim.folder:
                    self.claim.forget(f"{path.name}/")
            raise error from e

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Restore the trained weights from a checkpoint in the project's format (non-DeepSpeed runs)."""
        from peft import set_peft_model_state_dict

        model = model or self.model
        if self._is_lora():
            state = read_weights(weights_in(resume_from_checkpoint, ADAPTER_WEIGHTS))
            result = set_peft_model_state_dict(model, state)
            if result.unexpected_keys:
                raise YakError(
                    f"checkpoint {resume_from_checkpoint} does not fit the model: unexpected "
                    f"{result.unexpected_keys[:5]}"
                )
        else:
            load_embeddings(model, resume_from_checkpoint)
