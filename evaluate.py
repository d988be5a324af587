"""Evaluate one or several models on Tibetan benchmarks and write a side-by-side report.

Language modelling in bits per UTF-8 byte and per character (comparable across tokenizers) on held-out
text in Tibetan, English and Chinese; TNCC and TUSA classification by label likelihood; Ti-MMLU multiple
choice, zero- and five-shot; Tibetan-English and Tibetan-Chinese translation (chrF++, BLEU); extractive QA
(exact match and F1 over syllables); and the tokenizer's tokens per syllable against Llama 2. Tasks are YAML
files (yak/evaluation/tasks/); models are Hugging Face or merged folders, or a base model with adapters.
Writes results.json, results.md, results.png and predictions/ to --output_dir. See docs/evaluation.md.
"""

from yak.cli import parse_args, run_main, setup_logging
from yak.evaluation import EvalArguments, evaluate


@run_main
def main() -> None:
    setup_logging()
    (args,) = parse_args([EvalArguments], description=__doc__)
    evaluate(args)


if __name__ == "__main__":
    main()
