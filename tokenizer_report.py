"""Compare tokenizers on held-out text: tokens per syllable, bytes per token and sequence-length reduction
against a reference (Llama 2), reachability of added pieces, fast/slow agreement, identity on other languages,
lossless round trip and encoding speed. Prints two tables and writes report.json, report.md and report.png to
OUTPUT_DIR.

Example: python tokenizer_report.py --tokenizers bpe32k=tokenizer unigram16k=outputs/unigram16k
--output_dir outputs/tokenizer_report
"""

from yak.cli import parse_args, run_main, setup_logging
from yak.tokenizer import ReportArguments, run_report


@run_main
def main() -> None:
    setup_logging()
    (args,) = parse_args([ReportArguments], description=__doc__)
    run_report(args)


if __name__ == "__main__":
    main()
