"""Model loading: base model, vocabulary resize with mean-initialised new rows, stage 1 / stage 2 preparation.

The pipeline applies, in this order: base model -> resize the vocabulary to the tokenizer (padded up to a
multiple of 64) -> stage-1 embeddings (``embeddings.safetensors``) -> CPT LoRA adapter -> SFT LoRA adapter.
:func:`load_model_and_tokenizer` does exactly that for inference, serving, merging and evaluation; training
uses the same pieces (:func:`load_base_model`, :func:`resize_and_init_embeddings`, :func:`prepare_stage1`,
:func:`prepare_lora`). The file formats are described in ``docs/formats.md``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from yak import YakError
from yak.formats import (
    DTYPES,
    EMBED_KEY,
    EMBEDDINGS_FILE,
    EMBEDDINGS_FILES,
    LM_HEAD_KEY,
    VOCAB_MULTIPLE,
    YAK_ADAPTER_FILE,
    YAK_ADAPTER_FORMAT,
    YAK_ADAPTER_VERSION,
    adapter_kind,
    adapter_vocab_rows,
    carries_lm_head,
    check_model_folder,
    has_tokenizer,
    padded_vocab_size,
    read_stage1,
    read_weights,
    weights_in,
)
from yak.io import atomic_write_json
from yak.tokenizer import load_tokenizer

if TYPE_CHECKING:
    from yak.source import ModelSource

logger = logging.getLogger(__name__)

NEW_ROWS_INIT = ("mean", "random")  # how resize_and_init_embeddings fills new rows


@contextlib.contextmanager
def gathered(params: Sequence[torch.nn.Parameter], modify: bool = False) -> Iterator[None]:
    """Make ZeRO-3-partitioned ``params`` whole inside the block (a no-op without ZeRO-3).

    Args:
        params: the parameters to gather.
        modify: write changes made on rank 0 back to every rank's partition on exit.
    """
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params), modifier_rank=0 if modify else None):
            yield
    else:
        yield


def embedding_rows(model) -> int:
    """Rows of the input embedding matrix (also when ZeRO-3 has partitioned it: ``ds_shape``)."""
    weight = model.get_input_embeddings().weight
    return int(getattr(weight, "ds_shape", weight.shape)[0])


def resolve_dtype(name: str | torch.dtype) -> str | torch.dtype:
    """``"auto"`` stays ``"auto"`` (the checkpoint's own dtype); a name becomes a ``torch.dtype``."""
    if isinstance(name, torch.dtype) or name == "auto":
        return name
    if name not in DTYPES:
        raise YakError(f"unknown dtype {name!r}; use auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def load_base_model(
    path: str | os.PathLike,
    dtype: str | torch.dtype = "auto",
    device: str | None = None,
    load_in_kbits: int = 16,
    attn_implementation: str | None = None,
):
    """Load a causal LM from a Hugging Face folder: safetensors, or ``.bin`` weights holding plain tensors.

    The folder is checked first (:func:`yak.formats.check_model_folder`): a broken ``config.json``, a weight
    file cut short or a pickle that is not plain tensors is a one-line error naming the file. transformers
    reads ``.bin`` files with ``weights_only=True``.

    Args:
        path: the model folder.
        dtype: ``"auto"`` (the checkpoint's dtype), ``"bfloat16"``, ``"float16"``, ``"float32"``.
        device: ``"auto"`` (CUDA when present, else CPU), a device name, or ``None`` to leave the
            placement to the caller (the Trainer / DeepSpeed).
        load_in_kbits: 4 or 8 to quantize the weights with bitsandbytes; 16 for none.
        attn_implementation: passed to transformers (``sdpa``, ``eager``, ...).
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    check_model_folder(path)
    kwargs = {"dtype": resolve_dtype(dtype), "trust_remote_code": False}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    problem = kbits_problem(load_in_kbits)
    if problem:
        raise YakError(problem)
    if load_in_kbits != 16:
        kwargs["quantization_config"] = _kbit_config(load_in_kbits, dtype)
        device = device or "auto"
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device is not None:
        kwargs["device_map"] = {"": device}
    try:
        return AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except (ValueError, ImportError) as e:
        if attn_implementation and "attn_implementation" in str(e):  # a typo, or flash-attn not installed
            raise YakError(f"--attn_implementation {attn_implementation}: {e}") from e
        raise


def kbits_problem(bits: int) -> str | None:
    """Why ``--load_in_kbits bits`` cannot load (not 4, 8 or 16; 4 or 8 without bitsandbytes), or None."""
    import importlib.util

    if bits not in (4, 8, 16):
        return f"--load_in_kbits must be 4, 8 or 16, got {bits}"
    if bits != 16 and importlib.util.find_spec("bitsandbytes") is None:
        return (
            f"--load_in_kbits {bits} needs the bitsandbytes package (and a CUDA GPU): pip install "
            "bitsandbytes; or leave --load_in_kbits at 16"
        )
    return None


def _kbit_config(bits: int, dtype):
    from transformers import BitsAndBytesConfig

    compute = resolve_dtype(dtype)
    compute = torch.bfloat16 if compute == "auto" else compute
    if bits == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def is_tied(model) -> bool:
    out = model.get_output_embeddings()
    return out is None or out.weight is model.get_input_embeddings().weight


def check_tokenizer_extends(
    tokenizer, base_tokenizer, tokenizer_name: str = "tokenizer", base_name: str = "base tokenizer"
) -> None:
    """Raise if ``tokenizer`` does not keep the ids of ``base_tokenizer`` (new pieces must be appended)."""
    n = len(base_tokenizer)
    if len(tokenizer) < n:
        raise YakError(f"{tokenizer_name} has {len(tokenizer)} tokens, fewer than the {n} of {base_name}")
    new = tokenizer.convert_ids_to_tokens(list(range(n)))
    old = base_tokenizer.convert_ids_to_tokens(list(range(n)))
    diff = [i for i, (a, b) in enumerate(zip(old, new)) if a != b]
    if diff:
        i = diff[0]
        raise YakError(
            f"{tokenizer_name} is not an extension of {base_name}: {len(diff)} of the first {n} ids differ "
            f"(first: id {i} is {old[i]!r} in the base and {new[i]!r} in the new one). A merged tokenizer must "
            "keep the base pieces at their ids and append the new ones."
        )


def _base_piece_ids(piece: str, base_tokenizer) -> list[int]:
    """Ids of the pieces the base tokenizer's model splits ``piece`` into.

    The piece is given to the tokenization model itself (BPE/Unigram with byte fallback), in its internal
    form ("▁" marks a word start), bypassing the normaliser and pre-tokeniser: a continuation piece must
    not get the dummy word-start prefix that encoding it as text would add.
    """
    return [t.id for t in base_tokenizer.backend_tokenizer.model.tokenize(piece)]


@torch.no_grad()
def resize_and_init_embeddings(model, tokenizer, base_tokenizer, init: str = "mean") -> int:
    """Resize the vocabulary to ``len(tokenizer)`` padded to a multiple of 64 and initialise new rows.

    Each new token's row (in ``embed_tokens`` and, when untied, ``lm_head``) is the mean of the base model's
    rows of the pieces that ``base_tokenizer`` splits that token into (``init="mean"``), or drawn from
    N(0, ``initializer_range``) as a freshly built model's rows are (``init="random"``: what the original
    project's plain resize gave, kept for the ablation of bench/ablation.py). Padding rows beyond the
    tokenizer get the mean of all base rows either way. Rows of existing tokens are untouched, so on text
    without new tokens the hidden states and the logits of the old vocabulary are unchanged. Works under
    ZeRO-3.

    Args:
        model: a causal LM (tied or untied embeddings).
        tokenizer: the merged tokenizer (the base pieces first, at their ids).
        base_tokenizer: the tokenizer the model was trained with.
        init: ``"mean"`` or ``"random"`` (drawn from torch's global generator: seed it for a repeatable run).

    Returns:
        The new number of rows (unchanged if the model already has enough).
    """
    if init not in NEW_ROWS_INIT:
        raise YakError(f"new rows' initialisation must be one of {', '.join(NEW_ROWS_INIT)}, found {init!r}")
    check_tokenizer_extends(tokenizer, base_tokenizer)
    old_rows = embedding_rows(model)
    if old_rows < len(base_tokenizer):
        raise YakError(
            f"the model has {old_rows} embedding rows but its base tokenizer has "
            f"{len(base_tokenizer)} tokens: they do not belong together"
        )
    if len(tokenizer) <= old_rows:
        logger.info(
            "vocabulary: the tokenizer's %d tokens fit the model's %d rows; no resize",
            len(tokenizer),
            old_rows,
        )
        return old_rows
    new_rows = padded_vocab_size(len(tokenizer))
    model.resize_token_embeddings(new_rows, mean_resizing=False)
    n_base = len(base_tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(n_base, len(tokenizer))))
    sources = [_base_piece_ids(p, base_tokenizer) for p in pieces]
    weights = [model.get_input_embeddings().weight]
    if not is_tied(model):
        weights.append(model.get_output_embeddings().weight)
    std = getattr(model.config, "initializer_range", 0.02)
    with gathered(weights, modify=True):
        for w in weights:
            base_rows = w[:n_base].float()  # (V0, H); mean in fp32, then cast back
            if init == "random":
                w[n_base : len(tokenizer)] = torch.randn(len(sources), w.shape[1]).mul_(std).to(w)
            else:
                for i, ids in enumerate(sources):
                    w[n_base + i] = (base_rows[ids].mean(0) if ids else base_rows.mean(0)).to(w.dtype)
            w[len(tokenizer) :] = base_rows.mean(0).to(w.dtype)
    logger.info(
        "vocabulary: %d -> %d rows (%d tokens + %d padding); %d new rows initialised %s",
        old_rows,
        new_rows,
        len(tokenizer),
        new_rows - len(tokenizer),
        len(tokenizer) - n_base,
        f"at random, N(0, {std:g})" if init == "random" else "as the mean of their base pieces",
    )
    return new_rows


def embedding_keys(model) -> list[str]:
    """Key names of the trained embedding matrices in the stage-1 format: one for tied models, else two."""
    return [EMBED_KEY] if is_tied(_unwrap(model)) else [EMBED_KEY, LM_HEAD_KEY]


def embedding_state(model) -> dict[str, torch.Tensor]:
    """The full embedding matrices under the base model's key names (gathered under ZeRO-3), on the CPU."""
    model = _unwrap(model)
    tensors = {EMBED_KEY: model.get_input_embeddings().weight}
    if not is_tied(model):
        tensors[LM_HEAD_KEY] = model.get_output_embeddings().weight
    with gathered(list(tensors.values())):
        return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}


def _unwrap(model):
    """The transformers model below a peft wrapper (stage-1 models are never wrapped; kept for safety)."""
    from peft import PeftModel

    return model.get_base_model() if isinstance(model, PeftModel) else model


def save_embeddings(
    model,
    output_dir: str | os.PathLike,
    base_model_name_or_path: str,
    state: dict[str, torch.Tensor] | None = None,
    safetensors: bool = True,
) -> None:
    """Write the stage-1 output format: ``embeddings.safetensors`` + ``yak_adapter.json`` (docs/formats.md).

    Args:
        model: the trained model.
        output_dir: the folder to write into (created; the caller makes the folder atomic).
        base_model_name_or_path: recorded for the consumers.
        state: the tensors, if already gathered (ZeRO-3: every rank must join the gathering, only one saves).
        safetensors: False writes ``embeddings.bin`` (``torch.save`` of the state dict) instead.
    """
    from safetensors.torch import save_file

    state = embedding_state(model) if state is None else state
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if safetensors:
        save_file(state, str(output_dir / EMBEDDINGS_FILE), metadata={"format": "pt"})
    else:
        torch.save(state, output_dir / EMBEDDINGS_FILES[1])
    atomic_write_json(
        output_dir / YAK_ADAPTER_FILE,
        {
            "format": YAK_ADAPTER_FORMAT,
            "version": YAK_ADAPTER_VERSION,
            "base_model_name_or_path": str(base_model_name_or_path),
            "vocab_size": int(state[EMBED_KEY].shape[0]),
            "tie_word_embeddings": LM_HEAD_KEY not in state,
        },
    )


@torch.no_grad()
def load_embeddings(model, folder: str | os.PathLike) -> None:
    """Copy stage-1 embeddings into ``model`` (already resized to the same number of rows)."""
    folder = Path(folder)
    info = read_stage1(folder)
    state = read_weights(weights_in(folder, EMBEDDINGS_FILES))
    rows = embedding_rows(model)
    problems = []
    if info["tie_word_embeddings"] != is_tied(model):
        problems.append(
            f"it was trained with tie_word_embeddings={info['tie_word_embeddings']}, the model has "
            f"{is_tied(model)}"
        )
    for key, t in state.items():
        if t.shape[0] != rows:
            problems.append(f"{key} has {t.shape[0]} rows, the model {rows}")
    if problems:
        raise YakError(f"stage-1 embeddings {folder} do not fit the model: " + "; ".join(problems))
    targets = {EMBED_KEY: model.get_input_embeddings().weight}
    if not is_tied(model):
        targets[LM_HEAD_KEY] = model.get_output_embeddings().weight
    missing = sorted(set(targets) - set(state))
    if missing:
        raise YakError(f"{weights_in(folder, EMBEDDINGS_FILES)} lacks {', '.join(missing)}")
    with gathered(list(targets.values()), modify=True):
        for key, w in targets.items():
            w.copy_(state[key].to(w.dtype))


def apply_adapters(model, adapters: Sequence[str | os.PathLike]):
    """Apply stage outputs in order: stage-1 embeddings are copied in, LoRA adapters are merged.

    Returns the model (a new object when a LoRA adapter was merged).
    """
    from peft import PeftModel

    for folder in adapters:
        if adapter_kind(folder) == "embeddings":
            load_embeddings(model, folder)
        else:
            try:
                model = PeftModel.from_pretrained(model, str(folder), is_trainable=False).merge_and_unload()
            except (RuntimeError, ValueError) as e:  # peft: size mismatches, or target modules not found
                lines = [line.strip() for line in str(e).splitlines()]
                detail = next((line for line in lines if "size mismatch" in line or "not found in the base model"
                               in line), None)
                if detail is None:  # something else (e.g. out of memory): not a question of fit
                    raise
                raise YakError(f"the LoRA adapter {folder} does not fit this model ({detail}); it was made for "
                               "another base model: give that one as the base") from e
        logger.info("applied %s", folder)
    return model


def resize_for_adapters(model, tokenizer, adapters: Sequence[str | os.PathLike], tokenizer_name: str) -> None:
    """Resize the vocabulary for ``tokenizer`` and check that every adapter's embeddings have that size."""
    rows = embedding_rows(model)
    target = padded_vocab_size(len(tokenizer)) if len(tokenizer) > rows else rows
    problems = []
    for folder in adapters:
        n = adapter_vocab_rows(folder)
        if n is not None and n != target:
            problems.append(f"{folder} carries embeddings of {n} rows")
        elif n is not None and has_tokenizer(folder) and load_tokenizer(folder).get_vocab() != tokenizer.get_vocab():
            # same size, other pieces (e.g. a tokenizer rebuilt from other text): its rows mean other tokens
            problems.append(f"{folder} was trained with another tokenizer of that size (saved there)")
    if problems:
        raise YakError(
            f"the tokenizer {tokenizer_name} has {len(tokenizer)} tokens, so the model is resized to {target} "
            f"rows (a multiple of {VOCAB_MULTIPLE}), but "
            + "; ".join(problems)
            + ". Use the tokenizer the adapters were trained with."
        )
    if len(tokenizer) > rows and not any(adapter_vocab_rows(a) for a in adapters):
        raise YakError(
            f"the tokenizer {tokenizer_name} has {len(tokenizer)} tokens but the model has only {rows} embedding "
            "rows, and no adapter brings trained rows for the new tokens. Pass the stage-1/stage-2 output "
            "folders as adapters, or a merged model."
        )
    if target != rows and not is_tied(model) and not any(carries_lm_head(a) for a in adapters):
        # training mean-initialised the new output rows; resizing here would leave them random
        raise YakError(
            f"the model's lm_head is untied and is resized from {rows} to {target} rows, but none of the "
            "adapters carries a trained lm_head for the new tokens (train with --modules_to_save "
            "embed_tokens,lm_head, or put stage 1's output first)"
        )
    if target != rows:
        model.resize_token_embeddings(target, mean_resizing=False)


def load_model_and_tokenizer(source: ModelSource, device: str | None = "auto", attn_implementation: str | None = None):
    """Load a model for use (inference, serving, evaluation, merging): base + adapters, in eval mode.

    Args:
        source: the base model folder (a base model or a merged one), the output folders of training stages
            applied in order (stage 1's ``embeddings.safetensors`` and/or peft LoRA adapters, which are merged
            into the weights), the tokenizer and the dtype; see :class:`yak.source.ModelSource`.
        device: ``"auto"`` (CUDA if present, else CPU) or a device name.
        attn_implementation: passed to transformers (None: its default, ``sdpa``).

    Returns:
        ``(model, tokenizer)``, the tokenizer from :meth:`ModelSource.tokenizer_dir`.
    """
    problems = source.problems()  # every folder checked before anything large is loaded
    if problems:
        raise YakError("; ".join(problems))
    adapters = [Path(a) for a in source.adapters]
    tok_dir = source.tokenizer_dir()
    tokenizer = load_tokenizer(tok_dir)
    model = load_base_model(source.base_model, dtype=source.dtype, device=device,
                            attn_implementation=attn_implementation)
    resize_for_adapters(model, tokenizer, adapters, tok_dir)
    model = apply_adapters(model, adapters)
    model.eval()
    return model, tokenizer


def compile_decoder_layers(model) -> int:
    """Compile every decoder layer in place (``nn.Module.compile``); returns how many were compiled.

    Regional compilation: the layers share one class, so they share one compiled graph and the start-up cost
    is that of a single layer. In place, so parameter names, peft wrappers and saving are unchanged.
    Works on a plain model or a peft model (the layers are found through the base model's decoder).
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = inner.get_decoder().layers
    for layer in layers:
        layer.compile()
    logger.info("compiled %d decoder layers (torch.compile, regional)", len(layers))
    return len(layers)


def prepare_stage1(model) -> None:
    """Stage 1: train only ``embed_tokens`` (and an untied ``lm_head``); freeze every other weight."""
    for p in model.parameters():
        p.requires_grad_(False)
    model.get_input_embeddings().weight.requires_grad_(True)
    model.get_output_embeddings().weight.requires_grad_(True)  # the same tensor when tied


def prepare_lora(
    model,
    rank: int,
    alpha: float,
    dropout: float,
    target_modules: Sequence[str],
    modules_to_save: Sequence[str],
):
    """Stage 2 and SFT: wrap ``model`` with a peft LoRA adapter; ``modules_to_save`` train in full.

    Tied embeddings stay tied (peft's ``ensure_weight_tying``): one trained matrix, saved under both keys.
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    tied = is_tied(model)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        modules_to_save=list(modules_to_save) or None,
        task_type="CAUSAL_LM",
        # only when an embedding is trained in full; otherwise peft warns that nothing tied was added
        ensure_weight_tying=tied
        and any(m.split(".")[-1] in ("embed_tokens", "lm_head") for m in modules_to_save),
    )
    return get_peft_model(model, config)
