"""``inference_hf.py``: chat on the terminal, or answer every line of a file, with the engine or vLLM."""

from __future__ import annotations

import logging
import os

import torch

from yak import YakError
from yak.generation.arguments import GenerationArguments, InferenceArguments
from yak.generation.loading import load_for_inference
from yak.generation.prompts import chat_messages, encode_chat, encode_raw
from yak.generation.request import TextStreamer
from yak.generation.sampling import SamplingParams
from yak.outdir import output_file_problems, replace_file
from yak.source import ModelSource
from yak.template import LLAMA2_CHAT_TEMPLATE

logger = logging.getLogger(__name__)

CLEAR, QUIT = "/clear", "/quit"


class _EngineBackend:
    """Generation through :class:`Engine` (streams in interactive mode)."""

    def __init__(self, source: ModelSource, gen_args: GenerationArguments):
        model, self.tokenizer = load_for_inference(source, gen_args)
        self.engine = gen_args.build_engine(model, self.tokenizer)
        self.max_total_tokens = self.engine.max_total_tokens

    def generate(self, prompts: list[list[int]], params: SamplingParams, progress) -> tuple[list[str], int]:
        """The answers, and how many tokens were generated in all."""
        requests = self.engine.generate(prompts, params, progress=progress)
        texts = [self.tokenizer.decode(r.output_ids, skip_special_tokens=True) for r in requests]
        return texts, sum(len(r.output_ids) for r in requests)

    def chat_once(self, prompt: list[int], params: SamplingParams, on_text) -> str:
        streamer = TextStreamer(self.tokenizer, skip_special_tokens=True)
        request = self.engine.submit(prompt, params, streamer)
        for piece in streamer:
            on_text(piece)
        request.wait()
        return self.tokenizer.decode(request.output_ids, skip_special_tokens=True)


class _VllmBackend:
    """Generation through vLLM; prompts are tokenized by our tokenizer and passed as ids, so both agree."""

    def __init__(self, source: ModelSource, gen_args: GenerationArguments):
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            raise YakError("--use_vllm needs vLLM, which is not installed: pip install vllm (Linux with a CUDA "
                           "GPU); or leave out --use_vllm to generate with transformers")
        if source.adapters or gen_args.load_in_8bit or gen_args.load_in_4bit or gen_args.only_cpu:
            raise YakError("--use_vllm takes a merged model folder on GPUs: merge adapters first with "
                           "merge_lora_low_mem.py and drop --adapters/--load_in_*bit/--only_cpu")
        from vllm import LLM

        from yak.tokenizer import load_tokenizer

        if gen_args.gpus is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = gen_args.gpus
        problems = source.problems()  # the base's files whole before vLLM meets them
        if problems:
            raise YakError("; ".join(problems))
        self.tokenizer = load_tokenizer(source.tokenizer_dir())
        if getattr(self.tokenizer, "chat_template", None) is None:
            self.tokenizer.chat_template = LLAMA2_CHAT_TEMPLATE
        gpus = len(gen_args.gpus.split(",")) if gen_args.gpus else max(torch.cuda.device_count(), 1)
        self.llm = LLM(model=source.base_model, tokenizer=source.tokenizer_dir(), dtype=source.dtype,
                       tensor_parallel_size=gpus, max_model_len=gen_args.max_total_tokens)
        self.max_total_tokens = gen_args.max_total_tokens

    def generate(self, prompts: list[list[int]], params: SamplingParams, progress) -> tuple[list[str], int]:
        """The answers, and how many tokens were generated in all."""
        from vllm import SamplingParams as VllmParams

        vp = VllmParams(max_tokens=params.max_new_tokens, temperature=params.temperature, top_p=params.top_p,
                        top_k=params.top_k or -1, repetition_penalty=params.repetition_penalty)
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], vp, use_tqdm=progress is not None)
        return [o.outputs[0].text for o in outputs], sum(len(o.outputs[0].token_ids) for o in outputs)

    def chat_once(self, prompt: list[int], params: SamplingParams, on_text) -> str:
        text = self.generate([prompt], params, None)[0][0]  # vLLM's offline API does not stream
        on_text(text)
        return text


def run_inference(source: ModelSource, gen_args: GenerationArguments, inf_args: InferenceArguments) -> None:
    """``inference_hf.py``: interactive chat or file predictions, with the engine or vLLM."""
    from yak.defaults import with_default_model

    problems = gen_args.problems()
    if inf_args.interactive == (inf_args.data_file is not None):
        problems.append("give exactly one of --interactive and --data_file")
    if inf_args.data_file is not None and not os.path.isfile(inf_args.data_file):
        problems.append(f"--data_file {inf_args.data_file} does not exist")
    if not inf_args.predictions_file.endswith((".json", ".jsonl")):
        problems.append(f"--predictions_file must end in .json or .jsonl, got {inf_args.predictions_file}")
    if inf_args.data_file is not None and os.path.abspath(inf_args.predictions_file) == os.path.abspath(
            inf_args.data_file):
        problems.append("--predictions_file is --data_file: the answers would replace the inputs")
    elif inf_args.data_file is not None:  # found only after every answer was generated
        problems += output_file_problems(inf_args.predictions_file, inf_args.overwrite, "--predictions_file")
    if problems:
        raise YakError("; ".join(problems))
    lines = _read_inputs(inf_args.data_file) if inf_args.data_file else []
    source = with_default_model(source)
    logger.info("options: %s %s %s", source, gen_args, inf_args)
    backend = (_VllmBackend if inf_args.use_vllm else _EngineBackend)(source, gen_args)
    gen_args.check_room(backend.max_total_tokens)
    if inf_args.interactive:
        _interactive(backend, gen_args, inf_args.with_prompt)
    else:
        _predict_file(backend, gen_args, inf_args, lines)


def _read_inputs(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:  # \r\n and \r read as \n
            text = f.read()
        # not splitlines(): it also splits at U+2028, U+0085, form feeds ..., and answers would shift lines
        lines = text.removesuffix("\n").split("\n") if text else []
    except UnicodeDecodeError as e:
        raise YakError(f"--data_file {path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    empty = [str(i + 1) for i, line in enumerate(lines) if not line.strip()]
    if not lines or empty:
        raise YakError(f"--data_file {path}: " + (f"empty lines {', '.join(empty[:10])}" if empty else "no lines")
                       + "; give one input per line")
    return lines


def _prompt(tokenizer, text: str, history: list, gen_args: GenerationArguments, with_prompt: bool) -> list[int]:
    if not with_prompt:
        return encode_raw(tokenizer, text)
    return encode_chat(tokenizer, chat_messages(text, history, gen_args.system_prompt))


def _predict_file(backend, gen_args: GenerationArguments, inf_args: InferenceArguments, lines: list[str]) -> None:
    import json
    import time

    from tqdm import tqdm

    params = gen_args.sampling()
    prompts = []
    for i, line in enumerate(lines):
        try:
            prompts.append(_prompt(backend.tokenizer, line, [], gen_args, inf_args.with_prompt))
        except ValueError as e:
            raise YakError(f"--data_file {inf_args.data_file}, line {i + 1}: {e}") from None
    too_long = [str(i + 1) for i, p in enumerate(prompts) if len(p) + params.max_new_tokens > backend.max_total_tokens]
    if too_long:
        raise YakError(f"--data_file {inf_args.data_file}: lines {', '.join(too_long[:10])} do not fit "
                       f"--max_total_tokens {backend.max_total_tokens} with --max_new_tokens "
                       f"{params.max_new_tokens}; raise the first or lower the second")
    start = time.perf_counter()
    # locked (and checked again) while the answers are generated, not only when they are written
    with replace_file(inf_args.predictions_file, inf_args.overwrite, "--predictions_file") as tmp:
        with tqdm(total=len(prompts), desc="generating", unit="input") as bar:
            outputs, tokens = backend.generate(prompts, params, bar)
        seconds = time.perf_counter() - start
        records = [{"id": i, "input": line, "output": out} for i, (line, out) in enumerate(zip(lines, outputs))]
        if inf_args.predictions_file.endswith(".jsonl"):
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        else:
            text = json.dumps(records, ensure_ascii=False, indent=2) + "\n"
        tmp.write_text(text, encoding="utf-8")
    print(f"\n| inputs | answer tokens | seconds | tokens/s |\n|---|---|---|---|\n"
          f"| {len(lines)} | {tokens} | {seconds:.1f} | {tokens / seconds:.1f} |\n"
          f"predictions: {inf_args.predictions_file}")


def _interactive(backend, gen_args: GenerationArguments, with_prompt: bool) -> None:
    import sys

    params = gen_args.sampling()
    history: list[list[str]] = []
    mode = "chat, the conversation is kept" if with_prompt else "plain text continuation"
    print(f"Interactive mode ({mode}). Commands: {CLEAR} forgets the conversation, {QUIT} exits.", flush=True)
    while True:
        try:
            line = input("user> ").strip()
        except EOFError:
            break
        if line == QUIT:
            break
        if line == CLEAR:
            history.clear()
            print("(conversation cleared)", flush=True)
            continue
        if not line:
            continue
        try:
            prompt = _prompt(backend.tokenizer, line, history, gen_args, with_prompt)
        except ValueError as e:
            print(f"({e})", flush=True)
            continue
        while len(prompt) + params.max_new_tokens > backend.max_total_tokens and history:
            history.pop(0)  # forget the oldest turn rather than refuse the question
            prompt = _prompt(backend.tokenizer, line, history, gen_args, with_prompt)
        if len(prompt) + params.max_new_tokens > backend.max_total_tokens:
            print(f"(input too long: {len(prompt)} tokens + --max_new_tokens {params.max_new_tokens} > "
                  f"--max_total_tokens {backend.max_total_tokens})", flush=True)
            continue
        print("assistant> ", end="", flush=True)
        answer = backend.chat_once(prompt, params, lambda t: print(t, end="", flush=True))
        print(flush=True)
        if with_prompt:
            history.append([line, answer])
    sys.stdout.flush()
