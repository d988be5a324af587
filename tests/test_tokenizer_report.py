"""The tokenizer report and the reusable stats function, on the shipped tiny-model tokenizer."""

import json
import subprocess
import sys

import pytest
import sentencepiece as spm
from transformers import AutoTokenizer

from tests.conftest import PT_DATA, ROOT, TINY_MODEL
from yak import YakError
from yak.tokenizer import HF_DIR, SP_DIR, ReportArguments, run_report, tokenizer_stats

TINY_BO = ROOT / "tokenizer" / "stories260K_bo"


def test_tokenizer_stats_counts_and_reduction():
    fast = AutoTokenizer.from_pretrained(TINY_BO / HF_DIR)
    base = spm.SentencePieceProcessor(model_file=str(TINY_MODEL / "tokenizer.model"))
    texts = (PT_DATA / "bo" / "mila.txt").read_text(encoding="utf-8").splitlines()[:5]
    s = tokenizer_stats(fast, texts, reference=base)
    assert s["tokens"] == sum(len(fast(t, add_special_tokens=False).input_ids) for t in texts)
    assert s["reference_tokens"] == sum(len(ids) for ids in base.encode(texts))
    assert s["length_reduction"] == pytest.approx(1 - s["tokens"] / s["reference_tokens"])
    assert s["bytes"] == sum(len(t.encode()) for t in texts)
    assert s["syllables"] > 500 and s["tokens_per_syllable"] < 1.5 < s["reference_tokens_per_syllable"]
    assert "length_reduction" not in tokenizer_stats(base, texts)


def test_report_writes_table_json_and_png(tmp_path, capsys):
    out = tmp_path / "report"
    args = ReportArguments(
        tokenizers=[f"tiny_bo={TINY_BO}", f"converted={TINY_BO / SP_DIR / 'tokenizer.model'}"],
        reference=str(TINY_MODEL), heldout=[str(PT_DATA / "bo" / "mila.txt")],
        other_text=[str(PT_DATA / "en")], output_dir=str(out))
    results = run_report(args)
    assert "tokens/syllable" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [".yak_manifest.json", "report.json", "report.md", "report.png"]
    tiny, converted = json.loads((out / "report.json").read_text())
    assert tiny == json.loads(json.dumps(results[0]))
    assert tiny["reachable"] == tiny["fast_slow_agreement"] == tiny["round_trip"] == 1.0
    assert tiny["added_pieces"] == 3000 and tiny["heldout"]["mila"]["length_reduction"] > 0.6
    assert tiny["tokens_vs_source_alone"] <= 1.0 and tiny["encode_mb_s"] > 0 and tiny["encode_mb_s_with_offsets"] > 0
    # transformers' own conversion of the same tokenizer.model: same pieces, its own pipeline
    assert converted["vocab_size"] == tiny["vocab_size"] and "tokens_vs_source_alone" not in converted
    with pytest.raises(YakError, match="already exists"):
        run_report(args)
    # a held-out file without the script (it was an IndexError traceback in the last column)
    args.heldout, args.output_dir = [str(PT_DATA / "en" / "austen_pride_and_prejudice.txt")], str(tmp_path / "r2")
    with pytest.raises(YakError, match="austen_pride_and_prejudice holds no text in the script 0F00-0FFF"):
        run_report(args)
    assert not (tmp_path / "r2").exists()


def test_report_keeps_same_named_files_apart_and_never_counts_negative_additions(tmp_path):
    """Held-out files of one name in two folders each get their own results (the second overwrote the first),
    and a candidate smaller than the reference adds 0 pieces (it showed -3000)."""
    lines = (PT_DATA / "bo" / "mila.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    for folder, part in (("modern", lines[:5]), ("classical", lines[5:10])):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "test.txt").write_text("".join(part), encoding="utf-8")
    args = ReportArguments(tokenizers=[f"tiny={TINY_MODEL}"], reference=str(TINY_BO / SP_DIR),
                           heldout=[str(tmp_path / "modern"), str(tmp_path / "classical" / "test.txt")],
                           other_text=[], output_dir=str(tmp_path / "report"))
    (tiny,) = run_report(args)
    assert sorted(tiny["heldout"]) == ["classical/test", "modern/test"]
    assert tiny["heldout"]["modern/test"]["texts"] == tiny["heldout"]["classical/test"]["texts"] == 5
    assert tiny["heldout"]["modern/test"]["bytes"] != tiny["heldout"]["classical/test"]["bytes"]
    assert tiny["vocab_size"] == 512 and tiny["added_pieces"] == 0
    assert "| classical/test | 0 " in (tmp_path / "report" / "report.md").read_text()


def test_report_script_help_and_bad_input(tmp_path):
    res = subprocess.run([sys.executable, "tokenizer_report.py", "--help"], cwd=ROOT, capture_output=True,
                         text=True)
    assert res.returncode == 0 and "--tokenizers" in res.stdout
    res = subprocess.run([sys.executable, "tokenizer_report.py", "--tokenizers", str(tmp_path / "none"),
                          "--output_dir", str(tmp_path / "r")], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 2 and "does not exist" in res.stderr and not (tmp_path / "r").exists()


def test_report_refuses_to_overwrite_its_inputs(tmp_path):
    """--overwrite replaces output_dir as a whole: an output folder that is or holds an input is refused."""
    tok = tmp_path / "tok"
    (tok / HF_DIR).mkdir(parents=True)
    for f in (TINY_BO / HF_DIR).iterdir():
        (tok / HF_DIR / f.name).write_bytes(f.read_bytes())
    text = tmp_path / "held" / "mila.txt"
    text.parent.mkdir()
    text.write_text((PT_DATA / "bo" / "mila.txt").read_text(encoding="utf-8"), encoding="utf-8")
    before = sorted(p for p in tmp_path.rglob("*"))
    for out, inp in [(tok, tok), (tmp_path, tok), (text.parent, text)]:
        args = ReportArguments(tokenizers=[f"tiny_bo={tok}"], reference=str(TINY_MODEL), heldout=[str(text)],
                               other_text=[], output_dir=str(out), overwrite=True)
        with pytest.raises(YakError, match=r"is \(or contains\) the input") as e:
            run_report(args)
        assert f"--output_dir {out}" in str(e.value) and str(inp) in str(e.value)
    assert sorted(p for p in tmp_path.rglob("*")) == before
