"""Continued-pretraining data: blocks, mix shares, cache keys, atomic cache writes, bad input.

Real tokenizers (the tiny model's own) on real text copied from the shipped samples.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
import shutil
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from transformers import AutoTokenizer, TrainingArguments

from tests.conftest import HELDOUT, PT_DATA, ROOT
from yak import YakError
from yak.cli import parse_args
from yak.data import DataArguments, build_pretraining_datasets
from yak.tokenizer import load_tokenizer

BLOCK = 32
MERGED = ROOT / "tokenizer" / "stories260K_bo" / "merged_tokenizer_hf"  # engineer T's shipped tokenizer


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _lines(rel: str, n: int) -> list[str]:
    return (PT_DATA / rel).read_text(encoding="utf-8").split("\n")[:n]


def _write(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def corpus(tmp_path) -> Path:
    """bo/, en/, zh/ with real text: about 25, 37 and 13 kB."""
    root = tmp_path / "pt"
    _write(root / "bo" / "kangyur.txt", _lines("bo/kangyur_vol001.txt", 15))
    _write(root / "en" / "austen.txt", _lines("en/austen_pride_and_prejudice.txt", 600))
    _write(root / "zh" / "hongloumeng.txt", _lines("zh/hongloumeng_ch001-080.txt", 20))
    return root


def _args(root: Path, cache: Path, **kw) -> DataArguments:
    kw.setdefault("block_size", BLOCK)
    kw.setdefault("preprocessing_num_workers", 1)
    return DataArguments(dataset_dir=str(root), data_cache_dir=str(cache), **kw)


def _script(text: str) -> str:
    """The script most characters of ``text`` are in: the oracle for which source a block came from."""
    counts = Counter(
        "bo" if "\u0f00" <= c <= "\u0fff" else "zh" if "\u3000" <= c <= "\u9fff" or "\uff00" <= c <= "\uffef"
        else "en" if c.isascii() and c.isalpha() else None
        for c in text
    )
    counts.pop(None, None)
    return counts.most_common(1)[0][0] if counts else "other"


def _text(tok, ids: list[int]) -> str:
    """The text of a block, cut anywhere: its pieces' bytes (byte-fallback pieces as bytes), partial
    characters at the edges left out. (``decode`` turns a run of bytes cut mid-character into U+FFFD.)"""
    out = bytearray()
    for piece in tok.convert_ids_to_tokens([i for i in ids if i not in tok.all_special_ids]):
        if re.fullmatch(r"<0x[0-9A-F]{2}>", piece):
            out.append(int(piece[3:5], 16))
        else:
            out += piece.replace("\u2581", " ").encode()
    return out.decode("utf-8", errors="ignore")


def _shares(tok, rows) -> dict[str, float]:
    kinds = Counter(_script(_text(tok, r["input_ids"])) for r in rows)
    return {k: v / sum(kinds.values()) for k, v in kinds.items()}


def _entries(cache: Path) -> dict[str, int]:
    """Complete cache entries and when they were written."""
    return {p.name: (p / "meta.json").stat().st_mtime_ns for p in cache.iterdir() if not p.name.startswith(".")}


def _ids(ds) -> list[list[int]]:
    return ds["input_ids"][:]


def test_mix_shares_follow_the_request(tok, corpus, tmp_path, caplog):
    cache = tmp_path / "cache"
    caplog.set_level(logging.INFO, logger="yak.data")
    ds = build_pretraining_datasets(tok, _args(corpus, cache))  # default: bo=3, en+zh=4
    assert all(len(r) == BLOCK for r in _ids(ds["train"])) and len(ds["validation"]) == 3
    shares = _shares(tok, ds["train"])
    assert shares["bo"] == pytest.approx(3 / 7, abs=0.03)
    assert shares["en"] + shares["zh"] == pytest.approx(4 / 7, abs=0.03)
    # inside the group en and zh keep their natural proportion (tokens of each file, one block per BLOCK)
    natural = {s: len(tok((corpus / s).glob("*.txt").__next__().read_text())["input_ids"]) for s in ("en", "zh")}
    assert shares["en"] / shares["zh"] == pytest.approx(natural["en"] / natural["zh"], rel=0.05)
    assert "requested" in caplog.text and "achieved" in caplog.text and "42.9%" in caplog.text

    # another mix from the same cache: nothing re-tokenized; zh comes first, so it is used once
    before = _entries(cache)
    ds = build_pretraining_datasets(tok, _args(corpus, cache, mix="zh=1,bo=1,en=2"))
    assert _entries(cache) == before
    shares = _shares(tok, ds["train"])
    assert shares["zh"] == pytest.approx(0.25, abs=0.03) and shares["bo"] == pytest.approx(0.25, abs=0.03)
    assert shares["en"] == pytest.approx(0.5, abs=0.03)
    train = set(map(tuple, _ids(ds["train"])))
    assert not train & set(map(tuple, _ids(ds["validation"])))


def _reference_blocks(tok, lines: list[str]) -> Counter:
    """BOS + ids + EOS per non-blank line, concatenated, cut into blocks: through the tokenizer's own
    ``__call__`` (another code path than the pipeline's)."""
    ids = []
    for line in lines:
        if line.strip():
            ids += tok(line, split_special_tokens=True)["input_ids"] + [tok.eos_token_id]
    return Counter(tuple(ids[i : i + BLOCK]) for i in range(0, len(ids) - BLOCK + 1, BLOCK))


def test_blocks_are_the_tokenized_samples_txt_and_jsonl(tok, tmp_path, caplog):
    # files directly in dataset_dir: one source ".", the default mix falls back to natural proportions
    lines = _lines("bo/mila.txt", 3) + ["", "He wrote </s> and <s> in the text."] + _lines("en/austen_pride_and_prejudice.txt", 40)
    root = tmp_path / "flat"
    root.mkdir()
    # a UTF-8 BOM and Windows line ends must not change the samples
    (root / "a.txt").write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode())
    _write(root / "b.jsonl", [json.dumps({"text": line, "id": i}, ensure_ascii=False) for i, line in enumerate(lines)])
    ds = build_pretraining_datasets(tok, _args(root, tmp_path / "c1", validation_split_percentage=0))
    assert "natural proportions" in caplog.text
    expected = _reference_blocks(tok, lines)
    assert Counter(map(tuple, _ids(ds["train"]))) == expected + expected  # the .txt and the .jsonl
    assert len(ds["validation"]) == 0

    # several processes give the same blocks in the same order
    ds2 = build_pretraining_datasets(
        tok, _args(root, tmp_path / "c2", validation_split_percentage=0, preprocessing_num_workers=2)
    )
    assert _ids(ds2["train"]) == _ids(ds["train"])


def test_cache_reused_unless_tokenizer_file_or_block_size_changed(tok, corpus, tiny_model_dir, tmp_path):
    cache = tmp_path / "cache"
    first = _ids(build_pretraining_datasets(tok, _args(corpus, cache))["train"])
    entries = _entries(cache)
    assert len(entries) == 3

    # nothing changed, and the same tokenizer from another folder: loaded, not rebuilt
    copy = shutil.copytree(tiny_model_dir, tmp_path / "tokenizer_copy")
    again = build_pretraining_datasets(AutoTokenizer.from_pretrained(copy), _args(corpus, cache))
    assert _entries(cache) == entries and _ids(again["train"]) == first

    # a changed tokenizer (one more piece: a Tibetan syllable from the text) rebuilds every source,
    # with exactly the ids a build from an empty cache gives
    tok2 = AutoTokenizer.from_pretrained(copy)
    tok2.add_tokens(["སྐད"])
    changed = _ids(build_pretraining_datasets(tok2, _args(corpus, cache))["train"])
    assert len(_entries(cache)) == 6 and changed != first
    assert changed == _ids(build_pretraining_datasets(tok2, _args(corpus, tmp_path / "fresh"))["train"])

    # a changed file rebuilds its source only
    moby = (HELDOUT / "en_moby_dick_heldout.txt").read_text(encoding="utf-8").split("\n")[:50]
    with open(corpus / "en" / "austen.txt", "a", encoding="utf-8") as f:
        f.write("\n".join(moby) + "\n")
    before = _entries(cache)
    build_pretraining_datasets(tok, _args(corpus, cache))
    new = set(_entries(cache)) - set(before)
    assert len(new) == 1 and next(iter(new)).startswith("en-")

    # a changed block size rebuilds every source
    ds = build_pretraining_datasets(tok, _args(corpus, cache, block_size=BLOCK * 2))
    assert len(_entries(cache)) == 10 and len(ds["train"][0]["input_ids"]) == BLOCK * 2


def test_merged_tokenizer_gets_its_own_entries_and_keeps_the_shares(tok, corpus, tmp_path):
    merged = load_tokenizer(MERGED)
    cache = tmp_path / "cache"
    base = build_pretraining_datasets(tok, _args(corpus, cache))
    ds = build_pretraining_datasets(merged, _args(corpus, cache))
    assert len(_entries(cache)) == 6
    assert max(max(r) for r in _ids(ds["train"])) >= len(tok)  # the new Tibetan pieces are used
    assert len(ds["train"]) < len(base["train"]) / 2  # Tibetan needs far fewer tokens, so the mix shrinks
    assert _shares(merged, ds["train"])["bo"] == pytest.approx(3 / 7, abs=0.03)


def test_killed_build_leaves_no_cache_entry(tok, tmp_path):
    """SIGKILL while the cache is being written: no entry appears, and the next run builds a correct one."""
    args = _args(PT_DATA, tmp_path / "cache")
    # a forked child starts building at once (a fresh interpreter would spend seconds importing)
    child = multiprocessing.get_context("fork").Process(target=build_pretraining_datasets, args=(tok, args))
    child.start()
    deadline = time.time() + 120
    while time.time() < deadline and child.is_alive():
        if _cache_busy(tmp_path / "cache"):
            os.kill(child.pid, signal.SIGKILL)
            break
        time.sleep(0.001)
    child.join()
    assert child.exitcode == -signal.SIGKILL, "the build ended before it could be killed"
    assert all((tmp_path / "cache" / e / "meta.json").is_file() for e in _entries(tmp_path / "cache"))
    rebuilt = build_pretraining_datasets(tok, args)
    fresh = build_pretraining_datasets(tok, _args(PT_DATA, tmp_path / "fresh"))
    assert _ids(rebuilt["train"]) == _ids(fresh["train"])


def _cache_busy(cache: Path) -> bool:
    """A build is writing: its hidden work or temporary folder exists."""
    return cache.is_dir() and any(p.name.startswith(".") for p in cache.iterdir())


def _rank(rank: int, port: int, tok, args: DataArguments, out: Path) -> None:
    """One process of a two-process (gloo) run that prepares the data as train.py does."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    logging.basicConfig(filename=out / f"rank{rank}.log", level=logging.INFO, force=True)
    training_args = TrainingArguments(output_dir=str(out / "run"), use_cpu=True, ddp_backend="gloo", report_to=[])
    with training_args.main_process_first(local=False):
        ds = build_pretraining_datasets(tok, args, seed=training_args.seed)
    (out / f"rank{rank}.json").write_text(json.dumps(_ids(ds["train"])))


def test_two_processes_prepare_the_data_once(tok, corpus, tmp_path):
    """Rank 0 builds the cache inside ``main_process_first``; rank 1 waits, then loads it."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("fork")
    ranks = [ctx.Process(target=_rank, args=(r, port, tok, _args(corpus, tmp_path / "cache"), tmp_path))
             for r in (0, 1)]
    for p in ranks:
        p.start()
    try:
        for p in ranks:
            p.join(120)
    finally:
        for p in ranks:
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in ranks] == [0, 0]
    logs = [(tmp_path / f"rank{r}.log").read_text() for r in (0, 1)]
    assert logs[0].count("building cache entry") == 3 and "building cache entry" not in logs[1]
    assert logs[1].count("from cache") == 3
    assert (tmp_path / "rank0.json").read_text() == (tmp_path / "rank1.json").read_text()


# --------------------------------------------------------------------------------------------- bad input


def test_missing_empty_or_unusable_dataset_dir(tok, tmp_path):
    with pytest.raises(YakError, match="does not exist"):
        build_pretraining_datasets(tok, _args(tmp_path / "nope", tmp_path / "c"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(YakError, match=r"no \*\.txt or \*\.jsonl files \(found: nothing\)"):
        build_pretraining_datasets(tok, _args(tmp_path / "empty", tmp_path / "c"))
    _write(tmp_path / "csv" / "bo" / "a.csv", _lines("bo/mila.txt", 2))
    with pytest.raises(YakError, match=r"found: 1 \.csv"):
        build_pretraining_datasets(tok, _args(tmp_path / "csv", tmp_path / "c"))
    _write(tmp_path / "blank" / "bo" / "a.txt", ["", "  "])
    with pytest.raises(YakError, match="source bo: its files hold no text"):
        build_pretraining_datasets(tok, _args(tmp_path / "blank", tmp_path / "c"))
    assert not (tmp_path / "c").exists() or not _entries(tmp_path / "c")


def test_bad_lines_are_all_listed_with_file_and_line(tok, tmp_path):
    root = tmp_path / "pt"
    bo = _lines("bo/mila.txt", 3)
    _write(root / "bo" / "a.jsonl", [json.dumps({"text": bo[0]}), json.dumps({"txt": bo[1]}), "{broken", "[1]"])
    bad = root / "en" / "b.txt"
    bad.parent.mkdir()
    bad.write_bytes("Chapter 1\n".encode() + b"caf\xe9 au lait\n" + "It is a truth.\n".encode())
    with pytest.raises(YakError) as e:
        build_pretraining_datasets(tok, _args(root, tmp_path / "c", mix="none", on_decode_error="stop"))
    msg = str(e.value)
    for where in ['a.jsonl: line 2: no "text" string', "a.jsonl: line 3: not JSON", 'a.jsonl: line 4: no "text"',
                  "b.txt:2: not valid UTF-8"]:
        assert where in msg
    assert "--on_decode_error skip" in msg
    assert not (tmp_path / "c").exists() or not _entries(tmp_path / "c")
    bad.unlink()  # JSON problems alone: --on_decode_error skip would not fix them, so it is not suggested
    with pytest.raises(YakError, match='line 2: no "text" string') as e:
        build_pretraining_datasets(tok, _args(root, tmp_path / "c", mix="none"))
    assert "--on_decode_error" not in str(e.value)


def test_undecodable_lines_skipped_and_counted(tok, tmp_path, caplog):
    lines = _lines("en/austen_pride_and_prejudice.txt", 60)
    raw = "\n".join(lines).encode().split(b"\n")
    raw.insert(7, b"caf\xe9 au lait")
    (tmp_path / "pt").mkdir()
    (tmp_path / "pt" / "a.txt").write_bytes(b"\n".join(raw))
    args = _args(tmp_path / "pt", tmp_path / "c", validation_split_percentage=0)
    ds = build_pretraining_datasets(tok, args)
    assert "a.txt: skipped 1 lines that are not UTF-8 (lines 8)" in caplog.text
    assert Counter(map(tuple, _ids(ds["train"]))) == _reference_blocks(tok, lines)
    caplog.clear()
    build_pretraining_datasets(tok, args)  # from the cache: still reported
    assert "skipped 1 lines" in caplog.text
    # the cache entry of the skipping run must not let a run that asks to stop through
    with pytest.raises(YakError, match="a.txt:8: not valid UTF-8"):
        build_pretraining_datasets(tok, _args(tmp_path / "pt", tmp_path / "c", validation_split_percentage=0,
                                              on_decode_error="stop"))


def test_files_longer_than_a_chunk(tok, tmp_path, monkeypatch, caplog):
    """Chunk boundaries neither lose, split nor repeat a line, and line numbers run on across chunks."""
    import yak.data.read

    monkeypatch.setattr(yak.data.read, "CHUNK_BYTES", 2048)  # the 18 kB file below spans 9 chunks
    lines = _lines("en/austen_pride_and_prejudice.txt", 300)
    raw = "\n".join(lines).encode().split(b"\n")
    raw.insert(200, b"caf\xe9 au lait")
    (tmp_path / "pt").mkdir()
    (tmp_path / "pt" / "a.txt").write_bytes(b"\n".join(raw))
    # blocks of one token keep every token, so a split line would show as an extra BOS and EOS
    ds = build_pretraining_datasets(tok, _args(tmp_path / "pt", tmp_path / "c", block_size=1, mix="none",
                                               validation_split_percentage=0))
    expected = Counter(i for line in lines if line.strip()
                       for i in tok(line, split_special_tokens=True)["input_ids"] + [tok.eos_token_id])
    assert Counter(r[0] for r in _ids(ds["train"])) == expected
    assert "skipped 1 lines that are not UTF-8 (lines 201)" in caplog.text


def test_block_size_larger_than_the_data(tok, corpus, tmp_path):
    with pytest.raises(YakError, match=r"--block_size 20000 is larger than the data:\n  source zh: 20 samples"):
        build_pretraining_datasets(tok, _args(corpus, tmp_path / "c", block_size=20000))


@pytest.mark.parametrize(
    "mix, message",
    [
        ("bo=3,en+fr=4", "names fr, which are not sub-folders with text; and it does not name zh"),
        ("bo=3,en=1", "does not name zh"),
        ("bo=3,en+zh", "'en+zh' is not source"),
        ("bo=0,en+zh=4", "'bo=0' is not"),
        ("bo=3,en+bo=4,zh=1", "source 'bo' appears twice"),
    ],
)
def test_bad_mix_is_refused(tok, corpus, tmp_path, mix, message):
    with pytest.raises(YakError, match=message.replace("+", r"\+")):
        build_pretraining_datasets(tok, _args(corpus, tmp_path / "c", mix=mix))


def test_default_mix_drops_absent_folders(tok, corpus, tmp_path, caplog):
    shutil.rmtree(corpus / "zh")
    ds = build_pretraining_datasets(tok, _args(corpus, tmp_path / "c"))
    assert "no folder for zh" in caplog.text
    assert _shares(tok, ds["train"])["bo"] == pytest.approx(3 / 7, abs=0.03)


def test_all_bad_options_in_one_error(tok, corpus, tmp_path):
    with pytest.raises(YakError) as e:
        build_pretraining_datasets(
            tok, _args(corpus, tmp_path / "c", block_size=0, validation_split_percentage=100,
                       on_decode_error="ignore", preprocessing_num_workers=0)
        )
    for option in ("--block_size 0", "--validation_split_percentage 100", "--on_decode_error 'ignore'",
                   "--preprocessing_num_workers 0"):
        assert option in str(e.value)


def test_data_arguments_parse_and_document_every_option(tmp_path):
    (args,) = parse_args([DataArguments], ["--dataset_dir", "x", "--mix", "bo=1,en=1", "--block_size", "64"])
    assert (args.dataset_dir, args.mix, args.block_size) == ("x", "bo=1,en=1", 64)
    assert all(f.metadata.get("help") for f in DataArguments.__dataclass_fields__.values())
    with pytest.raises(SystemExit):  # argparse refuses a value outside the choices
        parse_args([DataArguments], ["--on_decode_error", "ignore"])


def test_bench_script_answers_help(capsys, monkeypatch):
    import runpy

    with pytest.raises(SystemExit) as e:
        monkeypatch.setattr(sys, "argv", ["data_prep.py", "--help"])
        runpy.run_path(str(Path(__file__).resolve().parent.parent / "bench" / "data_prep.py"), run_name="__main__")
    assert e.value.code == 0 and "2 MB/s" in capsys.readouterr().out
