"""The guarantees of the shipped Llama 2 + Tibetan tokenizer, on every line of real text.

- every added piece is reachable;
- text without Tibetan encodes exactly as with the original Llama 2 tokenizer;
- the fast tokenizer (tokenizer.json) gives SentencePiece's ids on every line, Tibetan and mixed included;
- decode(encode(x)) == x, byte-fallback characters included;
- <unk>, <s>, </s> and all 32,000 original pieces keep their ids.
"""

import json

import pytest
import sentencepiece as spm
from transformers import AutoTokenizer

from tests.conftest import HELDOUT, PT_DATA, ROOT
from yak.template import LLAMA2_CHAT_TEMPLATE
from yak.tokenizer import (
    HF_DIR,
    SP_DIR,
    has_script,
    load_sp_model,
    load_tokenizer,
    mismatching_lines,
    parse_script_ranges,
    unreachable_pieces,
)

SHIPPED = ROOT / "tokenizer"
LLAMA2 = SHIPPED / "llama2" / "tokenizer.model"
TIBETAN = parse_script_ranges("0F00-0FFF")
# Text without Tibetan that stresses the pre-processing: code, digits, emoji (byte fallback), whitespace runs.
NON_TIBETAN = [
    "", " ", "  ", "\t", "\n", " leading space", "  two leading", "trailing space ", "a  b   c    d",
    "tab\tand\nnewline",
    "def f(x):\n    return x ** 2  # square", "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "3.14159 2026-11-27 1,000,000 007", "emoji 😀🎉 and 👍🏽 skin tone", "naïve café façade",
    "Ελληνικά русский",
    "[INST] <<SYS>> [/INST]", "▁ literal", "\u200b zero width", "\x00\x01 control",
]


@pytest.fixture(scope="module")
def tokenizers():
    merged = load_sp_model(SHIPPED / SP_DIR)
    slow = spm.SentencePieceProcessor(model_file=str(SHIPPED / SP_DIR / "tokenizer.model"))
    base = spm.SentencePieceProcessor(model_file=str(LLAMA2))
    return merged, slow, load_tokenizer(SHIPPED), base


def _real_lines(shared_data=None):
    files = sorted(PT_DATA.glob("*/*.txt")) + sorted(HELDOUT.glob("*.txt"))
    lines = [x for f in files for x in f.read_text(encoding="utf-8").split("\n")]
    if shared_data is not None:  # local-only evaluation text: syllable-separated and parallel Tibetan
        for f in sorted(shared_data.glob("eval/*/*.jsonl")):
            for row in map(json.loads, f.read_text(encoding="utf-8").splitlines()[:400]):
                lines += [v for v in row.values() if isinstance(v, str)]
    return lines


def _mixed(lines):
    """Real Tibetan lines joined with real English and Chinese ones, and with emoji (byte fallback)."""
    bo = [x[:300] for x in lines if has_script(x, TIBETAN)][:200]
    other = [x for x in lines if x.strip() and not has_script(x, TIBETAN)][:200]
    out = []
    for a, b, extra in zip(bo, other, NON_TIBETAN * 10):
        out += [f"{a} {b}", f"{b}{a}", f"{a}\n{extra}{a[:40]}", f"  {a}  ", f"{a}😀{b[:20]}"]
    return out


def test_original_ids_are_kept(tokenizers):
    merged, slow, fast, base = tokenizers
    original = load_sp_model(LLAMA2)
    assert [(p.piece, p.type) for p in merged.pieces[:32000]] == [(p.piece, p.type) for p in original.pieces]
    assert (fast.unk_token_id, fast.bos_token_id, fast.eos_token_id) == (0, 1, 2)
    vocab = fast.get_vocab()
    assert all(vocab[p.piece] == i for i, p in enumerate(original.pieces))
    assert len(fast) == slow.get_piece_size() == len(merged.pieces)


def test_every_added_piece_is_reachable_and_tibetan(tokenizers):
    merged = tokenizers[0]
    added = [p.piece for p in merged.pieces[32000:]]
    assert 20000 <= len(added) <= 32000
    assert all(has_script(p, TIBETAN) for p in added)
    assert unreachable_pieces(merged, added) == []


def test_text_without_tibetan_encodes_as_llama2(tokenizers, shared_data):
    _, slow, fast, base = tokenizers
    plain = [x for x in _real_lines(shared_data) + NON_TIBETAN if not has_script(x, TIBETAN)]
    assert len(plain) > 6000
    expected = base.encode(plain)
    assert [x for x, e in zip(plain, expected) if fast(x, add_special_tokens=False).input_ids != e] == []
    assert [x for x, e in zip(plain, expected) if slow.encode(x) != e] == []


def test_fast_equals_slow_and_round_trip_on_every_line(tokenizers, shared_data):
    _, slow, fast, _ = tokenizers
    lines = _real_lines(shared_data)
    lines += _mixed(lines) + NON_TIBETAN
    assert sum(has_script(x, TIBETAN) for x in lines) > 2000
    assert mismatching_lines(slow, fast, lines) == []
    # SentencePiece writes spaces as "▁", so a literal "▁" decodes as a space, in Llama 2 as here.
    lines = [x for x in lines if "▁" not in x]
    ids = fast(lines, add_special_tokens=False).input_ids
    assert [x for x, i in zip(lines, ids) if fast.decode(i) != x] == []
    assert [x for x in lines if slow.decode(slow.encode(x)) != x] == []


def test_hf_folder_loads_with_auto_tokenizer_and_template(tokenizers):
    fast = AutoTokenizer.from_pretrained(SHIPPED / HF_DIR)
    assert fast.chat_template == LLAMA2_CHAT_TEMPLATE
    assert fast("hello").input_ids[0] == 1 and fast("hello").input_ids[-1] != 2
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    chat = fast.apply_chat_template(messages, tokenize=False)
    assert chat.startswith("<s>[INST] <<SYS>>") and chat.endswith(" ok </s>")
    for folder in (SHIPPED / HF_DIR, SHIPPED / SP_DIR):
        assert "LLAMA 2 Community License" in (folder / "NOTICE").read_text()


def test_special_token_text(tokenizers):
    """Like every Hugging Face Llama tokenizer, the fast one reads a literal "<s>" as BOS unless told not."""
    _, slow, fast, _ = tokenizers
    text = "<s> [INST] hi"
    assert fast(text, add_special_tokens=False).input_ids[0] == 1
    assert fast(text, add_special_tokens=False, split_special_tokens=True).input_ids == slow.encode(text)
