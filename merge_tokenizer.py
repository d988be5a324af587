"""Build a merged tokenizer: train a SentencePiece model on text of a new script (Tibetan by default) and
merge its pieces into a Llama-family SentencePiece BPE tokenizer, so that every added piece is reachable, text
without the script encodes exactly as before, and the exported fast (tokenizer.json) and slow
(tokenizer.model) tokenizers give the same ids. Writes OUTPUT_DIR/merged_tokenizer_sp/tokenizer.model and
OUTPUT_DIR/merged_tokenizer_hf/ (loadable with AutoTokenizer, with the Llama 2 chat template).

Example: python merge_tokenizer.py --corpus ../shared/data/corpus/bo --base_tokenizer tokenizer/llama2
--num_pieces 20000 --output_dir my_tokenizer
"""

import logging

from yak.cli import parse_args, run_main, setup_logging
from yak.tokenizer import TokenizerArguments, build_merged_tokenizer

logger = logging.getLogger(__name__)


@run_main
def main() -> None:
    setup_logging()
    (args,) = parse_args([TokenizerArguments], description=__doc__)
    logger.info("options: %s", args)
    build_merged_tokenizer(args)


if __name__ == "__main__":
    main()
