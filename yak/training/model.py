"""The model of a run: load the base, bring its vocabulary to the tokenizer, apply earlier stages, prepare
this stage (stage 1: embeddings only; stage 2 and SFT: LoRA plus the saved modules)."""

from __future__ import annotations

import logging

import torch

from yak import YakError
from yak.formats import carries_lm_head
from yak.modeling import (
    apply_adapters,
    compile_decoder_layers,
    is_tied,
    load_base_model,
    prepare_lora,
    prepare_stage1,
    resize_and_init_embeddings,
    resize_for_adapters,
)
from yak.source import ModelSource
from yak.tokenizer import load_tokenizer
from yak.training.arguments import StageArguments

logger = logging.getLogger(__name__)


def build_model(source: ModelSource, stage_args: StageArguments, tokenizer, training_args, model=None):
    """Load the base, bring the vocabulary to the tokenizer, apply earlier stages, prepare this stage.

    Without ``--adapters``, new rows are initialised from the base tokenizer's pieces (or at random,
    ``--new_rows_init random``); with them, the
    earlier stage's trained rows are used. Trainable weights are kept in fp32 (the optimizer's master
    copy) while frozen weights stay in ``--dtype``; under DeepSpeed, DeepSpeed does that itself.

    Args:
        model: an already built base model to prepare instead of loading ``--base_model``
            (``bench/train_throughput.py`` builds one with random weights).
    """
    if model is None:
        if training_args.deepspeed:
            import deepspeed

            # ZeRO-3 partitions the weights while loading and needs DeepSpeed's communicator for that;
            # accelerate sets it up on GPUs but not on the CPU (a no-op when it is already up)
            deepspeed.init_distributed()
        model = load_base_model(
            source.base_model,
            dtype=source.dtype,
            load_in_kbits=stage_args.load_in_kbits,
            attn_implementation=stage_args.attn_implementation,
        )
    base_rows = model.config.vocab_size
    if source.adapters:
        resize_for_adapters(model, tokenizer, source.adapters, source.tokenizer_dir())
        model = apply_adapters(model, source.adapters)
    else:
        base_tok = load_tokenizer(stage_args.base_tokenizer_name_or_path or source.base_model)
        resize_and_init_embeddings(model, tokenizer, base_tok, init=stage_args.new_rows_init)
    model.config.use_cache = False
    if stage_args.uses_lora and model.config.vocab_size != base_rows:
        # the adapter would not carry the new tokens' rows: the output could never be loaded or merged
        saved = stage_args.saved_modules()
        lost = []
        if "embed_tokens" not in saved and not source.adapters:  # with adapters, one brings the rows
            lost.append("embed_tokens")
        if not is_tied(model) and "lm_head" not in saved and not any(carries_lm_head(a) for a in source.adapters):
            lost.append("lm_head")
        if lost:
            raise YakError(
                f"the vocabulary grows from {base_rows} to {model.config.vocab_size} rows, but --modules_to_save "
                f"{stage_args.modules_to_save!r} does not train {' and '.join(lost)} and no --adapters folder "
                f"carries {'them' if len(lost) > 1 else 'it'}: the new tokens' rows would be lost. Add "
                f"{','.join(lost)} to --modules_to_save, or start from stage 1's output with --adapters"
            )
    if stage_args.uses_lora:
        model = prepare_lora(
            model,
            stage_args.lora_rank,
            stage_args.lora_alpha,
            stage_args.lora_dropout,
            stage_args.trainable_modules(),
            stage_args.saved_modules(),
        )
    else:
        prepare_stage1(model)
    if not training_args.deepspeed:
        compute_dtype = model.get_input_embeddings().weight.dtype
        for p in model.parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()  # in place on the Parameter: tied weights stay one tensor
        if compute_dtype != torch.float32:
            keep_hidden_dtype(model, compute_dtype)
    if training_args.gradient_checkpointing and not model.get_input_embeddings().weight.requires_grad:
        model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
    if stage_args.compile_layers:
        compile_decoder_layers(model)
    trainable = sum(_numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(_numel(p) for p in model.parameters())
    logger.info(
        "trainable parameters: %s of %s (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total
    )
    return model


def keep_hidden_dtype(model, dtype: torch.dtype) -> None:
    """Cast the input embeddings' output to ``dtype``, the dtype of the frozen weights.

    The trained embeddings are kept in fp32 (the master copy), and an fp32 lookup would otherwise make the
    whole residual stream fp32: every norm, residual add and saved activation twice the bytes of the bf16
    model that the base was trained as and that inference runs. The cast keeps the forward what it is in the
    model's own dtype; gradients still reach the fp32 rows in fp32.
    """
    model.get_input_embeddings().register_forward_hook(lambda module, args, output: output.to(dtype))


def _numel(p: torch.nn.Parameter) -> int:
    return getattr(p, "ds_numel", p.numel())  # ZeRO-3 partitioned parameters are empty locally
