"""Merge stage-1 embeddings and LoRA adapters into a Llama base model with little memory.

Applies --adapters folders (alias --lora_model) in order (stage-1 output, CPT adapter, SFT adapter) to
--base_model, one tensor at a time from memory-mapped files, and writes Hugging Face safetensors shards or Meta's consolidated.NN.pth
layout to --output_dir, with the tokenizer and the merged vocab_size. Every input is checked before anything
is written. --verbose logs each tensor. Options may also come from one JSON/YAML file.
"""

from yak.cli import parse_args, run_main, setup_logging, verbose_logs
from yak.merge import MergeArguments, merge
from yak.source import ModelSource


@run_main
def main() -> None:
    setup_logging()
    source, args = parse_args([ModelSource, MergeArguments], description=__doc__)
    if args.verbose:
        verbose_logs()
    merge(source, args)


if __name__ == "__main__":
    main()
