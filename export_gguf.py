"""Convert a merged model to GGUF for llama.cpp and quantize it (e.g. f16 and q4_0).

Runs llama.cpp's own convert_hf_to_gguf.py on --model_dir (a folder written by merge_lora_low_mem.py), from
--llama_cpp_dir or from the llama.cpp sources of the llama-cpp-python source package (fetched once with pip
into ~/.cache/yak), then quantizes with llama-quantize or llama-cpp-python, and optionally checks that
llama.cpp tokenizes the lines of --check_file exactly as the Hugging Face tokenizer does.
"""

from yak.cli import parse_args, run_main, setup_logging
from yak.gguf import GGUFArguments, export_gguf


@run_main
def main() -> None:
    setup_logging()
    (args,) = parse_args([GGUFArguments], description=__doc__)
    export_gguf(args)


if __name__ == "__main__":
    main()
