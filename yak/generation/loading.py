"""Load a model and its tokenizer for generation: base + adapters merged, or a merged model (optionally
quantized), on the GPU unless told otherwise."""

from __future__ import annotations

import logging
import os

import torch

from yak import YakError
from yak.generation.arguments import ModelArguments
from yak.template import LLAMA2_CHAT_TEMPLATE

logger = logging.getLogger(__name__)


def load_for_inference(args: ModelArguments):
    """Load ``(model, tokenizer)`` for generation, in the checkpoint's dtype, on the GPU unless told otherwise.

    The tokenizer always carries a chat template (the toolkit's Llama 2 one when the folder has none).
    LoRA adapters are merged into the weights, which makes decoding as fast as for a merged model.

    Args:
        args: the model options; see :class:`ModelArguments`.
    """
    problems = []
    if not os.path.isdir(args.base_model):
        problems.append(f"--base_model {args.base_model} is not a folder")
    for a in args.lora_model:
        if not os.path.isdir(a):
            problems.append(f"--lora_model {a} is not a folder")
    if args.load_in_8bit and args.load_in_4bit:
        problems.append("choose one of --load_in_8bit and --load_in_4bit")
    if (args.load_in_8bit or args.load_in_4bit) and args.only_cpu:
        problems.append("--load_in_8bit/--load_in_4bit need a GPU; drop --only_cpu")
    if args.gpus is not None and args.only_cpu:
        problems.append("--gpus and --only_cpu contradict each other")
    if problems:
        raise YakError("; ".join(problems))
    if args.gpus is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = args.gpus  # before CUDA is initialised
    device = "cpu" if args.only_cpu or not torch.cuda.is_available() else "cuda"
    if args.load_in_8bit or args.load_in_4bit:
        model, tokenizer = _load_quantized(args, device)
    else:
        from yak.modeling import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer(args.base_model, adapters=args.lora_model,
                                                    tokenizer_path=args.tokenizer_path, dtype=args.dtype,
                                                    device=device)
    if getattr(tokenizer, "chat_template", None) is None:
        logger.warning("the tokenizer has no chat_template; using the toolkit's Llama 2 template")
        tokenizer.chat_template = LLAMA2_CHAT_TEMPLATE
    logger.info("loaded %s (%s, %s)", args.base_model, next(model.parameters()).dtype, next(model.parameters()).device)
    return model, tokenizer


def _load_quantized(args: ModelArguments, device: str):
    """bitsandbytes 8/4-bit loading of a merged model (LoRA cannot be merged into quantized weights)."""
    import importlib.util

    from yak.formats import tokenizer_dir
    from yak.modeling import load_base_model
    from yak.tokenizer import load_tokenizer

    if importlib.util.find_spec("bitsandbytes") is None:
        raise YakError("--load_in_8bit/--load_in_4bit need the bitsandbytes package: pip install bitsandbytes "
                       "(CUDA GPUs only)")
    if args.lora_model:
        raise YakError("quantized loading needs a merged model: merge the adapters first with "
                       "merge_lora_low_mem.py, then pass the merged folder as --base_model")
    if device != "cuda":
        raise YakError("--load_in_8bit/--load_in_4bit need a CUDA GPU")
    model = load_base_model(args.base_model, dtype=args.dtype, device=device,
                            load_in_kbits=8 if args.load_in_8bit else 4)
    return model.eval(), load_tokenizer(tokenizer_dir(args.base_model, [], args.tokenizer_path))
