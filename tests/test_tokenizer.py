"""The tokenizer stage: merge, export, the shipped tiny-model tokenizer, bad input."""

import shutil
import subprocess
import sys

import pytest
import sentencepiece as spm
from transformers import AutoTokenizer

from tests.conftest import HELDOUT, PT_DATA, ROOT, TINY_MODEL
from yak import YakError
from yak.template import LLAMA2_CHAT_TEMPLATE
from yak.tokenizer import (
    HF_DIR,
    SP_DIR,
    TokenizerArguments,
    build_merged_tokenizer,
    has_script,
    load_slow_tokenizer,
    load_sp_model,
    load_tokenizer,
    mismatching_lines,
    parse_script_ranges,
    unreachable_pieces,
)
from yak.tokenizer.corpus import iter_sentences

TINY_BO = ROOT / "tokenizer" / "stories260K_bo"
TIBETAN = parse_script_ranges("0F00-0FFF")


def _lines():
    files = sorted(PT_DATA.glob("*/*.txt")) + sorted(HELDOUT.glob("*.txt"))
    return [line for f in files for line in f.read_text(encoding="utf-8").split("\n")]


def test_merge_tokenizer_help():
    out = subprocess.run([sys.executable, "merge_tokenizer.py", "--help"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    assert "--num_pieces" in out and "merged_tokenizer_hf" in out


def test_shipped_tiny_tokenizer_keeps_base_ids_and_agrees_with_sentencepiece():
    fast = AutoTokenizer.from_pretrained(TINY_BO / HF_DIR)
    base = AutoTokenizer.from_pretrained(TINY_MODEL)
    assert 2500 <= len(fast) - len(base) <= 5000
    assert fast.convert_ids_to_tokens(list(range(512))) == base.convert_ids_to_tokens(list(range(512)))
    assert fast.chat_template == LLAMA2_CHAT_TEMPLATE
    slow = load_slow_tokenizer(TINY_BO)
    assert slow.get_piece_size() == len(fast)
    lines = _lines()
    assert mismatching_lines(slow, fast, lines) == []
    assert [x for x in lines if fast.decode(fast(x).input_ids, skip_special_tokens=True) != x] == []
    # The base's own tokenizer.model collapses runs of spaces, its Hugging Face tokenizer does not; the
    # merged one keeps spaces, so the oracle is the base model with that one setting off.
    base_sp = load_sp_model(TINY_MODEL)
    base_sp.normalizer_spec.remove_extra_whitespaces = False
    base_sp = spm.SentencePieceProcessor(model_proto=base_sp.SerializeToString())
    other = [x for x in lines if not has_script(x, TIBETAN)]
    assert len(other) > 5000
    assert [x for x in other if fast(x, add_special_tokens=False).input_ids != base_sp.encode(x)] == []
    tibetan = [x for x in lines if has_script(x, TIBETAN)]
    assert sum(len(fast(x).input_ids) for x in tibetan) < 0.5 * sum(len(base(x).input_ids) for x in tibetan)


def test_build_merges_reachable_pieces(tmp_path):
    out = tmp_path / "tok"
    args = TokenizerArguments(corpus=[str(PT_DATA / "bo")], base_tokenizer=str(TINY_MODEL), num_pieces=400,
                              output_dir=str(out))
    summary = build_merged_tokenizer(args)
    assert summary["added_pieces"] == 400 and summary["vocab_size"] == 912
    merged = load_sp_model(out / SP_DIR)
    added = [p.piece for p in merged.pieces[512:]]
    assert all(has_script(p, TIBETAN) for p in added)
    assert unreachable_pieces(merged, added) == []
    scores = [p.score for p in merged.pieces[512:]]
    assert all(a > b for a, b in zip(scores, scores[1:]))
    assert scores[0] < min(p.score for p in merged.pieces[:512])
    assert (out / HF_DIR / "tokenizer.model").read_bytes() == (out / SP_DIR / "tokenizer.model").read_bytes()
    assert len(load_tokenizer(out)) == 912


def test_merge_an_existing_sentencepiece_model(tmp_path):
    """--tibetan_sp_model merges a given model; a Unigram source keeps only reachable pieces."""
    trained = tmp_path / "bo.model"
    files = sorted((PT_DATA / "bo").glob("*.txt"))
    text = "\n".join(line for f in files for line in f.read_text().split("།"))
    (tmp_path / "bo.txt").write_text(text)
    spm.SentencePieceTrainer.train(input=str(tmp_path / "bo.txt"), model_prefix=str(tmp_path / "bo"),
                                   model_type="unigram", vocab_size=600, minloglevel=2)
    args = TokenizerArguments(tibetan_sp_model=str(trained), base_tokenizer=str(TINY_MODEL), num_pieces=200,
                              script_characters=False,
                              output_dir=str(tmp_path / "out"))
    summary = build_merged_tokenizer(args)
    merged = load_sp_model(tmp_path / "out" / SP_DIR)
    assert summary["added_pieces"] == 200 and summary["dropped_unreachable"] > 0
    assert unreachable_pieces(merged, [p.piece for p in merged.pieces[512:]]) == []


def test_bad_input_is_reported_at_once_and_leaves_nothing(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 ".encode("latin-1"))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    existing = tmp_path / "exists"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    args = TokenizerArguments(corpus=[str(bad), str(empty), str(tmp_path / "missing")],
                              base_tokenizer=str(PT_DATA / "bo" / "mila.txt"), output_dir=str(existing))
    with pytest.raises(YakError) as e:
        build_merged_tokenizer(args)
    for part in ["latin1.txt: not UTF-8", "empty.txt: file is empty", "missing: no such file",
                 "mila.txt is not a SentencePiece model", "already exists"]:
        assert part in str(e.value)
    wrong = TokenizerArguments(corpus=[str(PT_DATA / "en")], base_tokenizer=str(TINY_MODEL), num_pieces=500,
                               script_ranges="0F00-0FZZ", character_coverage=2.0,
                               output_dir=str(tmp_path / "o"))
    with pytest.raises(YakError) as e:
        build_merged_tokenizer(wrong)
    assert "--script_ranges" in str(e.value) and "--character_coverage" in str(e.value)
    # English text: it succeeded, adding nothing but the ranges' characters (the wrong corpus or ranges)
    english = TokenizerArguments(corpus=[str(PT_DATA / "en")], base_tokenizer=str(TINY_MODEL), num_pieces=100,
                                 output_dir=str(tmp_path / "o"))
    with pytest.raises(YakError, match=f"--corpus {PT_DATA / 'en'}: no character of --script_ranges 0F00-0FFF "
                                       "in any file"):
        build_merged_tokenizer(english)
    # a sentence of Tibetan among it: too few of the script's pieces for --num_pieces
    tibetan = tmp_path / "sentence.txt"
    tibetan.write_text((PT_DATA / "bo" / "mila.txt").read_text(encoding="utf-8")[:80], encoding="utf-8")
    english.corpus.append(str(tibetan))
    english.num_pieces = 500
    with pytest.raises(YakError, match=r"only 2\d\d reachable pieces.*in the script of --script_ranges"):
        build_merged_tokenizer(english)
    out = tmp_path / "out"
    too_many = TokenizerArguments(corpus=[str(PT_DATA / "bo")], base_tokenizer=str(TINY_MODEL),
                                  num_pieces=500_000, output_dir=str(out))
    with pytest.raises(YakError, match="--num_pieces 500000"):
        build_merged_tokenizer(too_many)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt", "exists", "latin1.txt", "sentence.txt"]


def test_output_dir_holding_an_input_is_refused(tmp_path):
    """With --overwrite the atomic rename would replace the folder that holds the base tokenizer or corpus."""
    base = tmp_path / "work" / "base"
    shutil.copytree(TINY_MODEL, base)
    for out in (base, tmp_path / "work"):
        args = TokenizerArguments(corpus=[str(PT_DATA / "bo")], base_tokenizer=str(base), num_pieces=100,
                                  output_dir=str(out), overwrite=True)
        with pytest.raises(YakError, match=r"is \(or contains\) the input"):
            build_merged_tokenizer(args)
    assert (base / "tokenizer.model").is_file()


def test_merge_tokenizer_script_exits_2_on_bad_input(tmp_path):
    res = subprocess.run([sys.executable, "merge_tokenizer.py", "--corpus", str(tmp_path / "none"),
                          "--output_dir", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 2 and "no such file or folder" in res.stderr
    assert not (tmp_path / "out").exists()


def test_long_lines_are_cut_into_chunks_sentencepiece_keeps():
    """SentencePiece drops lines over max_sentence_length silently: no chunk may be longer, no text lost."""
    f = PT_DATA / "bo" / "nanhai_modern_deseg.txt"
    lines = [x.strip() for x in f.read_text(encoding="utf-8").splitlines() if x.strip()]
    assert max(len(x.encode()) for x in lines) > 20_000
    chunks = list(iter_sentences([f], max_bytes=1000))
    assert max(len(c.encode()) for c in chunks) <= 1000
    # packed: sentences average about 300 bytes, chunks far more
    assert sum(len(c.encode()) for c in chunks) / len(chunks) > 600
    squeeze = str.maketrans("", "", " \t")
    assert "".join(chunks).translate(squeeze) == "".join(lines).translate(squeeze)
