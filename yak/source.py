"""Which model a script works on: a base model folder, the training outputs applied on top of it in order, the
tokenizer and the dtype. One :class:`ModelSource` serves ``train.py``, ``merge_lora_low_mem.py``,
``inference_hf.py``, ``serve_demo.py`` and ``evaluate.py``, with one spelling of each option; the original
project's flag names (``--model_name_or_path``, ``--tokenizer_name_or_path``, ``--torch_dtype`` of its training
script, ``--lora_model`` of its merge and inference scripts) are aliases.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from yak import YakError
from yak.formats import (
    DTYPES,
    adapter_base_problems,
    adapter_kind,
    adapter_order_problems,
    check_model_folder,
    check_tokenizer_files,
    tokenizer_dir,
)

logger = logging.getLogger(__name__)


def split_folders(values) -> list[str]:
    """Folders given as several values, comma-separated strings, or both (``"stage1, cpt"`` too)."""
    if values is None:
        return []
    if isinstance(values, (str, os.PathLike)):
        values = [values]
    return [p.strip() for v in values for p in os.fspath(v).split(",") if p.strip()]


@dataclass
class ModelSource:
    """The model to load: base model, adapters applied in order, tokenizer, dtype."""

    base_model: str | None = field(
        default=None,
        metadata={
            "aliases": ["--model_name_or_path"],
            "help": "Hugging Face model folder: the base model, or a merged one. Required.",
        },
    )
    adapters: list[str] = field(
        default_factory=list,
        metadata={
            "aliases": ["--lora_model"],
            "help": "Training output folders applied in order on top of --base_model (stage 1's embeddings, the "
            "CPT LoRA adapter, the SFT LoRA adapter), as several values or comma-separated; none for a merged "
            "model.",
        },
    )
    tokenizer_path: str | None = field(
        default=None,
        metadata={
            "aliases": ["--tokenizer_name_or_path"],
            "help": "Tokenizer folder; default: that of the last --adapters folder that has one, else the "
            "base model's.",
        },
    )
    dtype: str = field(
        default="auto",
        metadata={
            "aliases": ["--torch_dtype", "--output_dtype"],
            "help": "dtype of the weights: auto (as the base checkpoint is saved), bfloat16, float16 or float32. "
            "Training switches on the mixed precision that matches it; the merge writes it.",
            "choices": ["auto", *DTYPES],
        },
    )

    def __post_init__(self):
        if self.base_model is not None:
            self.base_model = os.fspath(self.base_model)
        if self.tokenizer_path is not None:
            self.tokenizer_path = os.fspath(self.tokenizer_path)
        self.adapters = split_folders(self.adapters)

    @classmethod
    def parse(cls, text: str, dtype: str = "auto") -> ModelSource:
        """A source written compactly as ``BASE[,ADAPTER1[,ADAPTER2...]]`` (``evaluate.py --models``)."""
        base, *adapters = split_folders(text) or [None]
        if base is None:
            raise YakError(f"{text!r}: expected BASE[,ADAPTER...] (a model folder, then adapter folders)")
        return cls(base_model=base, adapters=adapters, dtype=dtype)

    @staticmethod
    def renamed() -> dict[str, str]:
        """The original flag names and the options they stand for (``{"model_name_or_path": "base_model"}``)."""
        return {a.lstrip("-"): f.name for f in dataclasses.fields(ModelSource) for a in f.metadata.get("aliases", [])}

    def tokenizer_dir(self) -> str:
        """The tokenizer folder: ``--tokenizer_path``, else the last adapter folder with one, else the base's."""
        return str(tokenizer_dir(self.base_model, self.adapters, self.tokenizer_path))

    def problems(self, where: str | None = None, formats: bool = True) -> list[str]:
        """What is wrong with this source, checked before anything large is loaded (empty when valid).

        Args:
            where: prefix of every message (e.g. ``"model base"``) instead of the option names.
            formats: also check the files (:mod:`yak.formats`): the base's config, weights and tokenizer files
                whole, each adapter's files, and that each adapter was made for this base (its ``yak_base.json``
                and its shapes; an adapter without the record gets a warning). The merge reads the weights
                itself and reports more.
        """
        found = []  # (option, what is wrong)
        base = self.base_model
        if not base:
            found.append(("--base_model", "required: a Hugging Face model folder"))
        elif not Path(base).is_dir():
            found.append(("--base_model", f"{base} is not a folder"))
        elif formats:
            try:
                check_model_folder(base)
            except YakError as e:
                found.append(("--base_model", str(e)))
        for a in self.adapters:
            if not formats:
                if not Path(a).is_dir():
                    found.append(("--adapters", f"adapter folder {a} does not exist"))
                continue
            try:
                adapter_kind(a)
            except YakError as e:
                found.append(("--adapters", str(e)))
        found += [("--adapters", p) for p in adapter_order_problems(base, self.adapters)]
        if self.tokenizer_path and not Path(self.tokenizer_path).is_dir():
            found.append(("--tokenizer_path", f"{self.tokenizer_path} is not a folder"))
        elif self.tokenizer_path:
            try:
                check_tokenizer_files(self.tokenizer_path)
            except YakError as e:
                found.append(("--tokenizer_path", str(e)))
        if formats and self.adapters and not found:  # each adapter made for this base
            misfits, warnings = adapter_base_problems(base, self.adapters)
            found += [("--adapters", p) for p in misfits]
            for w in warnings:
                logger.warning("%s", w)
        if self.dtype not in ("auto", *DTYPES):
            found.append(("--dtype", f"{self.dtype!r} is not one of auto, {', '.join(DTYPES)}"))
        return [f"{where or option}: {text}" for option, text in found]
