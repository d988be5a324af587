"""Continued pretraining (stage 1: embeddings; stage 2: LoRA+ and embeddings) and SFT of a Llama-2-family model.

Usage: python train.py --base_model DIR --tokenizer_path DIR --dataset_dir data/pt \
    --stage 1 --output_dir out/stage1 ...   (or: python train.py config.yaml). See docs/training.md.
"""

from yak.cli import run_main, setup_logging
from yak.training import parse_train_args, run_training


@run_main
def main() -> None:
    setup_logging()
    run_training(*parse_train_args())


if __name__ == "__main__":
    main()
