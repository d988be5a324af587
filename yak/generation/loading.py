"""Load a model and its tokenizer for generation: base + adapters merged, or a merged model (optionally
quantized), on the GPU unless told otherwise."""

from __future__ import annotations

import logging
import os

import torch

from yak import YakError
from yak.generation.arguments import GenerationArguments
from yak.source import ModelSource
from yak.template import LLAMA2_CHAT_TEMPLATE

logger = logging.getLogger(__name__)


def load_for_inference(source: ModelSource, args: GenerationArguments):
    """Load ``(model, tokenizer)`` for generation, in the source's dtype, on the GPU unless told otherwise.

    The tokenizer always carries a chat template (the toolkit's Llama 2 one when the folder has none).
    LoRA adapters are merged into the weights, which makes decoding as fast as for a merged model.

    Args:
        source: the model; see :class:`ModelSource`.
        args: the device options (``--gpus``, ``--only_cpu``, ``--load_in_8bit``, ``--load_in_4bit``).
    """
    problems = source.problems()  # also checked by load_model_and_tokenizer; here with the device options
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
    attention = attention_implementation(args.use_flash_attention_2, device)
    if args.load_in_8bit or args.load_in_4bit:
        model, tokenizer = _load_quantized(source, args, device, attention)
    else:
        from yak.modeling import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer(source, device=device, attn_implementation=attention)
    if getattr(tokenizer, "chat_template", None) is None:
        logger.warning("the tokenizer has no chat_template; using the toolkit's Llama 2 template")
        tokenizer.chat_template = LLAMA2_CHAT_TEMPLATE
    logger.info("loaded %s (%s, %s)", source.base_model, next(model.parameters()).dtype, next(model.parameters()).device)
    return model, tokenizer


def attention_implementation(flash_attention_2: bool, device: str) -> str | None:
    """``flash_attention_2`` when asked for and possible (flash-attn installed, a CUDA device); else None
    (transformers' default, PyTorch's sdpa), with a warning that says why when it was asked for."""
    if not flash_attention_2:
        return None
    from transformers.utils import is_flash_attn_2_available

    if device != "cuda":
        why = "it needs a CUDA GPU"
    elif not is_flash_attn_2_available():
        why = "flash-attn is not installed (pip install flash-attn)"
    else:
        logger.info("--use_flash_attention_2: attention through flash-attn 2")
        return "flash_attention_2"
    logger.warning("--use_flash_attention_2: %s; using PyTorch's sdpa attention instead", why)
    return None


def _load_quantized(source: ModelSource, args: GenerationArguments, device: str, attention: str | None):
    """bitsandbytes 8/4-bit loading of a merged model (LoRA cannot be merged into quantized weights)."""
    import importlib.util

    from yak.modeling import load_base_model
    from yak.tokenizer import load_tokenizer

    if importlib.util.find_spec("bitsandbytes") is None:
        raise YakError("--load_in_8bit/--load_in_4bit need the bitsandbytes package: pip install bitsandbytes "
                       "(CUDA GPUs only)")
    if source.adapters:
        raise YakError("quantized loading needs a merged model: merge the adapters first with "
                       "merge_lora_low_mem.py, then pass the merged folder as --base_model (and no --adapters)")
    if device != "cuda":
        raise YakError("--load_in_8bit/--load_in_4bit need a CUDA GPU")
    model = load_base_model(source.base_model, dtype=source.dtype, device=device,
                            load_in_kbits=8 if args.load_in_8bit else 4, attn_implementation=attention)
    return model.eval(), load_tokenizer(source.tokenizer_dir())
