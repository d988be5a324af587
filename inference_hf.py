"""Generate with a Yak model: chat on the terminal (--interactive, streamed, with history; /clear and /quit) or
answer every line of --data_file in batches and write --predictions_file (.json or .jsonl, one answer per input
line, in order). Loads a merged model, or --base_model plus --adapters (alias --lora_model) training outputs
(without --base_model: the newest merged output of the shipped pipeline, else the shipped tiny model), on the
GPU (or the CPU with --only_cpu) in the checkpoint's dtype (--dtype; --use_flash_attention_2: flash-attn 2 when
installed); --with_prompt wraps inputs in the tokenizer's chat template; --temperature 0 decodes greedily;
--use_vllm generates with vLLM when it is installed. Options may also come from one JSON/YAML file.
"""

from yak.cli import parse_args, run_main, setup_logging
from yak.generation import GenerationArguments, InferenceArguments, run_inference
from yak.source import ModelSource


@run_main
def main() -> None:
    setup_logging()
    source, gen_args, inf_args = parse_args(
        [ModelSource, GenerationArguments, InferenceArguments], description=__doc__
    )
    run_inference(source, gen_args, inf_args)


if __name__ == "__main__":
    main()
