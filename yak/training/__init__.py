"""Training: continued pretraining (stage 1: embeddings; stage 2: LoRA+ and embeddings) and SFT.

A module per concern, in the order a run uses them:

- :mod:`yak.training.arguments`: ``StageArguments``, ``parse_train_args``, ``check_args`` (every option
  checked up front).
- :mod:`yak.training.schedule`: steps and warm-up (``resolve_schedule``).
- :mod:`yak.training.run_folder`: the output folder's run identity, checkpoints, resume
  (``prepare_output_dir``).
- :mod:`yak.training.model`: load and prepare the model for the stage (``build_model``).
- :mod:`yak.training.trainer`: ``YakTrainer`` and the LoRA+ parameter groups (``optimizer_groups``).
- :mod:`yak.training.report`: the loss plot and the summary table.
- :mod:`yak.training.run`: the run's steps, top to bottom (``run_training``).

``train.py`` uses the two entry points re-exported here.
"""

from yak.training.arguments import parse_train_args
from yak.training.run import run_training

__all__ = ["parse_train_args", "run_training"]
