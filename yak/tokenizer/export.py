"""The merged tokenizer's files: export matching slow (SentencePiece) and fast (Hugging Face tokenizers)
folders, load and save toolkit tokenizer folders, and compare slow with fast."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Iterable, Sequence

from yak import YakError
from yak.formats import check_tokenizer_files
from yak.template import LLAMA2_CHAT_TEMPLATE
from yak.tokenizer.pieces import WORD_BOUNDARY, load_sp_model, sp_processor

logger = logging.getLogger(__name__)

SP_DIR = "merged_tokenizer_sp"
HF_DIR = "merged_tokenizer_hf"
SOURCE_DIR = "new_script_sp"  # the trained new-script model alone, kept for --tibetan_sp_model and the report


def build_fast_tokenizer(sp_model_file: str | os.PathLike):
    """Build the tokenizers-backed equivalent of a Llama-family SentencePiece BPE model.

    The layout is that of Meta's Llama 2 ``tokenizer.json`` on the Hugging Face Hub: BPE with byte fallback
    and merges ordered by piece score (transformers' ``SentencePieceExtractor``), a normalizer that prepends
    ``▁`` and turns spaces into ``▁`` (SentencePiece's ``add_dummy_prefix``, which adds ``▁`` even before
    leading spaces), Llama's decoder, and ``<s>`` added by the post-processor. transformers 5's own
    ``LlamaTokenizer`` rebuilds a Metaspace pipeline that skips the dummy prefix before a leading space, so
    it would disagree with SentencePiece on such lines.

    Args:
        sp_model_file: the ``tokenizer.model`` file.

    Returns:
        A ``tokenizers.Tokenizer``.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE
    from transformers.tokenization_utils_sentencepiece import SentencePieceExtractor

    vocab, _, merges = SentencePieceExtractor(str(sp_model_file)).extract()
    tok = Tokenizer(BPE(vocab, merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(WORD_BOUNDARY),
                                           normalizers.Replace(" ", WORD_BOUNDARY)])
    tok.decoder = decoders.Sequence([decoders.Replace(WORD_BOUNDARY, " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return tok


LICENCE_FILES = ("NOTICE", "LICENSE", "LICENSE.txt", "USE_POLICY.md")


def export_tokenizer(proto, out_dir: Path, model_max_length: int | None = None,
                     licence_files: Sequence[Path] = ()) -> None:
    """Write ``out_dir/merged_tokenizer_sp/tokenizer.model`` and ``out_dir/merged_tokenizer_hf/``.

    ``merged_tokenizer_hf/`` holds ``tokenizer.model``, ``tokenizer.json`` (see :func:`build_fast_tokenizer`),
    ``tokenizer_config.json`` with the toolkit's Llama 2 chat template, and ``special_tokens_map.json``.

    Args:
        proto: the merged ``ModelProto``.
        out_dir: an existing empty folder.
        model_max_length: the base model's context length, if known.
        licence_files: the base tokenizer's licence files, copied into both folders (redistribution terms).
    """
    from transformers import PreTrainedTokenizerFast

    if proto.normalizer_spec.remove_extra_whitespaces:
        # transformers' Llama tokenizers never collapse spaces; keep the slow model in step with them.
        logger.warning("the base tokenizer collapses runs of spaces; the merged one keeps them, as "
                       "transformers' Llama tokenizers do")
        proto = type(proto).FromString(proto.SerializeToString())
        proto.normalizer_spec.remove_extra_whitespaces = False
    data = proto.SerializeToString()
    (out_dir / SP_DIR).mkdir()
    (out_dir / SP_DIR / "tokenizer.model").write_bytes(data)
    hf = out_dir / HF_DIR
    hf.mkdir()
    (hf / "tokenizer.model").write_bytes(data)
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=build_fast_tokenizer(hf / "tokenizer.model"),
        chat_template=LLAMA2_CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        **({"model_max_length": model_max_length} if model_max_length else {}),
        **special,
    )
    fast.save_pretrained(hf, save_jinja_files=False)
    fast.backend_tokenizer.save(str(hf / "tokenizer.json"), pretty=False)  # a third of the pretty size
    config = json.loads((hf / "tokenizer_config.json").read_text())
    # "add_bos_token" documents what the post-processor does, for readers of the config.
    # PreTrainedTokenizerFast (= TokenizersBackend in transformers 5) loads tokenizer.json as it is, in
    # transformers 4 and 5, vLLM and TGI alike.
    config.update(tokenizer_class="PreTrainedTokenizerFast", add_bos_token=True, add_eos_token=False,
                  pad_token=None)
    (hf / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n")
    (hf / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    for f in licence_files:
        for folder in (hf, out_dir / SP_DIR):
            shutil.copyfile(f, folder / f.name)


def load_tokenizer(path: str | os.PathLike):
    """Load a tokenizer folder with ``AutoTokenizer`` (tokenizers-backed, "fast").

    Args:
        path: a Hugging Face tokenizer folder, or a ``merge_tokenizer.py`` output folder (its
            ``merged_tokenizer_hf/`` is used).
    """
    from transformers import AutoTokenizer

    p = Path(path)
    if (p / HF_DIR).is_dir():
        p = p / HF_DIR
    if not (p / "tokenizer.json").is_file() and not (p / "tokenizer.model").is_file():
        found = sorted(x.name for x in p.iterdir()) if p.is_dir() else "nothing (no such folder)"
        raise YakError(f"tokenizer {path}: no tokenizer.json or tokenizer.model there (found: {found})")
    check_tokenizer_files(p)
    try:
        return AutoTokenizer.from_pretrained(str(p))
    except Exception as e:  # whatever transformers raises on files that passed the checks above
        raise YakError(f"tokenizer {p} cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0][:300]}); "
                       "check its files, or copy them again from where they were made") from e


def save_tokenizer(tokenizer, out_dir: str | os.PathLike) -> None:
    """Save ``tokenizer`` as a complete toolkit tokenizer folder, like ``merged_tokenizer_hf/``.

    transformers 5's ``save_pretrained`` alone moves the chat template to ``chat_template.jinja``, names the
    class ``TokenizersBackend`` (unknown to transformers 4 and older vLLM) and drops ``tokenizer.model``, without
    which llama.cpp's converter rebuilds the vocabulary differently (every Tibetan line then tokenizes
    differently in llama.cpp). So: ``save_pretrained`` with the template in ``tokenizer_config.json``, then
    ``tokenizer.model`` and the ``tokenizer_class`` of the folder the tokenizer was loaded from.

    Args:
        tokenizer: a (fast) tokenizer, possibly changed in memory (e.g. a chat template set).
        out_dir: an existing folder.
    """
    out = Path(out_dir)
    tokenizer.save_pretrained(out, save_jinja_files=False)
    src = Path(tokenizer.name_or_path)
    if (src / "tokenizer.model").is_file() and not (out / "tokenizer.model").is_file():
        shutil.copyfile(src / "tokenizer.model", out / "tokenizer.model")
    if (src / "tokenizer_config.json").is_file():
        cls = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8")).get("tokenizer_class")
        config = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
        if cls and config.get("tokenizer_class") != cls:
            config["tokenizer_class"] = cls
            (out / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n",
                                                       encoding="utf-8")


def load_slow_tokenizer(path: str | os.PathLike):
    """Load the SentencePiece ("slow") processor of a tokenizer folder or ``tokenizer.model`` file.

    Args:
        path: ``tokenizer.model``, a folder holding it, or a ``merge_tokenizer.py`` output folder.
    """
    p = Path(path)
    if (p / SP_DIR).is_dir():
        p = p / SP_DIR
    return sp_processor(load_sp_model(p, option="tokenizer"))


def mismatching_lines(slow, fast, lines: Iterable[str]) -> list[str]:
    """Lines on which the fast tokenizer's ids (no special tokens) differ from SentencePiece's.

    Args:
        slow: a ``sentencepiece.SentencePieceProcessor``.
        fast: a transformers tokenizer.
        lines: texts to compare.
    """
    return [x for x in lines if slow.encode(x) != fast.encode(x, add_special_tokens=False)]
