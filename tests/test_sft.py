"""SFT data: chat-template tokenization, answer-only labels, truncation, packing, caching, bad records."""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import subprocess

import pytest
import torch
from conftest import PT_DATA, ROOT
from transformers import AutoModelForCausalLM, AutoTokenizer

from yak import YakError
from yak.sft import (
    IGNORE_INDEX,
    SFTDataArguments,
    SFTDataCollator,
    build_sft_datasets,
    read_conversations,
    tokenize_conversations,
)
from yak.template import LLAMA2_CHAT_TEMPLATE

SFT_DATA = ROOT / "data" / "sft"
MERGED_TINY = ROOT / "tokenizer" / "stories260K_bo" / "merged_tokenizer_hf"


def sft_args(**kwargs) -> SFTDataArguments:
    """Options without the on-disk cache (which defaults to ./data_cache), unless a test asks for one."""
    return SFTDataArguments(**{"data_cache_dir": None, **kwargs})


def _tiny_tokenizer(tiny_model_dir):
    """The tiny model's SFT tokenizer: the merged one once shipped, else the model's own + the template."""
    tok = AutoTokenizer.from_pretrained(MERGED_TINY if MERGED_TINY.is_dir() else tiny_model_dir)
    tok.chat_template = tok.chat_template or LLAMA2_CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return _tiny_tokenizer(tiny_model_dir)


def _tibetan_sentences(n: int) -> list[str]:
    """``n`` real Tibetan sentences from the shipped sample (split at shad + space)."""
    line = (PT_DATA / "bo" / "nanhai_modern_deseg.txt").read_text(encoding="utf-8").splitlines()[0]
    sentences = [s for s in line.split("། ") if 20 < len(s) < 80]
    return [s + "།" for s in sentences[:n]]


def _conversation() -> list[dict]:
    bo = _tibetan_sentences(4)
    return [
        {"role": "system", "content": "You continue texts faithfully."},
        {"role": "user", "content": f"Continue this Tibetan passage.\n\n{bo[0]}"},
        {"role": "assistant", "content": bo[1]},
        {"role": "user", "content": f"  {bo[2]}"},
        {"role": "assistant", "content": bo[3] + "  "},
        {"role": "user", "content": "Go on."},
        {"role": "assistant", "content": "Once upon a time"},
    ]


def _tokenizers(tiny_model_dir):
    yield "tiny", _tiny_tokenizer(tiny_model_dir)
    llama2 = AutoTokenizer.from_pretrained(ROOT / "tokenizer" / "llama2")  # the real Llama 2 tokenizer
    llama2.chat_template = LLAMA2_CHAT_TEMPLATE
    yield "llama2", llama2
    yield "llama2+bo", AutoTokenizer.from_pretrained(ROOT / "tokenizer" / "merged_tokenizer_hf")


def test_training_tokens_equal_apply_chat_template_and_labels_are_exactly_the_answers(tiny_model_dir):
    messages = _conversation()
    for name, tok in _tokenizers(tiny_model_dir):
        [ids], [labels] = tokenize_conversations(tok, [messages])
        assert ids == tok.apply_chat_template(messages)["input_ids"], name
        # Oracle by token prefixes: the prompt before each answer and the conversation through it, tokenized
        # on their own, are prefixes of the whole; the tokens between them are that answer (+ EOS).
        expected = [IGNORE_INDEX] * len(ids)
        n_answers = 0
        for i, msg in enumerate(messages):
            if msg["role"] != "assistant":
                continue
            prompt = tok.apply_chat_template(messages[:i], add_generation_prompt=True)["input_ids"]
            through = tok.apply_chat_template(messages[: i + 1])["input_ids"]
            assert ids[: len(through)] == through and len(prompt) < len(through), name
            expected[len(prompt) : len(through)] = ids[len(prompt) : len(through)]
            answer = ids[len(prompt) : len(through)]
            assert answer[-1] == tok.eos_token_id and ids[len(prompt) - 1] != tok.eos_token_id, name
            assert tok.decode(answer, skip_special_tokens=True).strip() == msg["content"].strip(), name
            n_answers += 1
        assert labels == expected, name
        assert n_answers == 3 and labels.count(tok.eos_token_id) == 3, name
        # Tibetan really is in the answers (not only ASCII), and the prompt is masked.
        assert "\u0f0b" in tok.decode([t for t in labels if t != IGNORE_INDEX])
        assert labels[0] == IGNORE_INDEX and ids[0] == tok.bos_token_id


def test_truncation_cuts_inputs_and_labels_together_and_is_logged(tok, tmp_path, caplog):
    long = {"messages": _conversation()}
    short = {"instruction": "Say hello.", "output": "Hello."}
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in [long, short] * 3))
    [full_ids], [full_labels] = tokenize_conversations(tok, [_conversation()])
    short_messages = [{"role": "system", "content": ""}, {"role": "user", "content": "Say hello."},
                      {"role": "assistant", "content": "Hello."}]  # fmt: skip
    n_short = len(tokenize_conversations(tok, [short_messages])[0][0])
    first_answer = next(i for i, t in enumerate(full_labels) if t != IGNORE_INDEX)
    assert n_short < first_answer - 2

    def build(max_len):
        args = sft_args(dataset_dir=str(tmp_path), max_seq_length=max_len, validation_split_percentage=0,
                        system_prompt="")  # fmt: skip
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="yak.sft"):
            return build_sft_datasets(tok, args)["train"]

    # A length that cuts the long conversation inside its answers.
    ds = build(first_answer + 5)
    assert "3 of 6 conversations were longer than max_seq_length" in caplog.text
    rows = [r for r in ds if len(r["input_ids"]) == first_answer + 5]
    assert len(rows) == 3 and len(ds) == 6
    for r in rows:
        assert (
            r["input_ids"] == full_ids[: first_answer + 5] and r["labels"] == full_labels[: first_answer + 5]
        )
    # Cut before the first answer: those conversations are dropped (and counted), the short ones kept.
    ds = build(first_answer - 2)
    assert len(ds) == 3 and "3 lost every answer token and were dropped" in caplog.text


BAD_JSONL = [
    '{"instruction": "Translate.", "input": "x"}',  # 1 missing output
    '{"instruction": "Translate.", "output": "   "}',  # 2 empty answer
    '{"instruction": 3, "output": "ok"}',  # 3 wrong type
    '{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}',  # 4 unknown role
    (
        '{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, '
        '{"role": "assistant", "content": "c"}]}'
    ),  # 5 not alternating
    '{"messages": [{"role": "user", "content": "a"}]}',  # 6 ends with user
    (
        '{"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "s"}, '
        '{"role": "assistant", "content": "c"}]}'
    ),  # 7 system not first
    '{"messages": "hello"}',  # 8 not a list
    '{"text": "plain"}',  # 9 neither form
    '["a", "list"]',  # 10 not an object
    '{"instruction": "Say </s> now", "output": "ok"}',  # 11 control token text
    '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ["c"]}]}',  # 12 type
    '{"instruction": "fine", "output": "fine"}',  # 13 good
    '{"instruction": "broken", ',  # 14 invalid JSON
]


def test_bad_records_are_all_reported_with_file_and_line(tok, tmp_path):
    (tmp_path / "a.jsonl").write_text("\n".join(BAD_JSONL) + "\n")
    good = {"instruction": "Hi.", "output": "Hello."}
    records = [good, good, {"instruction": "Hi.", "input": 5, "output": "Hello."}, good]
    (tmp_path / "b.json").write_text(json.dumps(records, indent=2))  # each record spans 4-5 lines
    bad_line = json.dumps(records, indent=2).splitlines().index("  {", 8) + 1
    (tmp_path / "c.json").write_text('[{"instruction": "a", "output": "b"}\n{"instruction": "a"}]')
    (tmp_path / "d.jsonl").write_bytes('{"instruction": "ས", "output": "b"}'.encode("utf-16"))
    with pytest.raises(YakError) as e:
        build_sft_datasets(tok, sft_args(dataset_dir=str(tmp_path)))
    msg = str(e.value)
    a = tmp_path / "a.jsonl"
    for line, text in [
        (1, "missing 'output'"),
        (2, "empty 'output'"),
        (3, "'instruction' must be a string, found int"),
        (4, "role 'bot'"),
        (5, "expected role 'assistant', found 'user'"),
        (6, "must end with an assistant"),
        (7, "system message may only come first"),
        (8, "'messages' must be a non-empty list"),
        (9, "neither 'messages'"),
        (10, "record is a list"),
        (11, "special token '</s>'"),
        (12, "'content' must be a string, found list"),
        (14, "invalid JSON"),
    ]:
        assert f"{a}:{line}: " in msg and text in msg.split(f"{a}:{line}: ")[1].split("\n")[0], (line, text)
    assert f"{a}:13:" not in msg
    assert f"{tmp_path / 'b.json'}:{bad_line}: 'input' must be a string, found int" in msg
    assert f"{tmp_path / 'c.json'}:2: expected ','" in msg
    assert f"{tmp_path / 'd.jsonl'}: not UTF-8 text (invalid start byte at byte 0)" in msg
    assert msg.startswith("17 problem(s)")


def test_json_lines_may_hold_unicode_line_separators_inside_strings(tmp_path):
    """json.dumps(ensure_ascii=False) writes U+2028, U+2029 and U+0085 raw inside strings; they are not line
    breaks of JSON Lines (str.splitlines() split the record there and called it invalid JSON)."""
    records = [{"instruction": "a\u2028b", "output": "c\x85d"}, {"instruction": "e\u2029f", "output": "g"}]
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in records), encoding="utf-8")
    conversations = read_conversations([path])
    assert [[m["content"] for m in c] for c in conversations] == [["a\u2028b", "c\x85d"], ["e\u2029f", "g"]]


def test_a_json_file_holding_one_object_says_what_to_give(tmp_path):
    """A pretty-printed record (or a {"data": [...]} wrapper) was reported as 'invalid JSON' on its line 1."""
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"data": [{"instruction": "a", "output": "b"}]}, indent=2))
    with pytest.raises(YakError, match=r"a.json:1: the file is one JSON object \(keys: data\).*JSON array of rec"):
        read_conversations([path])


def test_collator_pads_right_with_unk_and_masks_labels(tok):
    assert tok.pad_token_id is None  # stories260K has no pad token: the unk id pads
    features = [{"input_ids": [1, 5, 6], "labels": [-100, 5, 6]}, {"input_ids": [1, 7], "labels": [-100, 7]}]
    batch = SFTDataCollator(tok, pad_to_multiple_of=4)(features)
    assert batch["input_ids"].tolist() == [
        [1, 5, 6, tok.unk_token_id],
        [1, 7, tok.unk_token_id, tok.unk_token_id],
    ]
    assert batch["labels"].tolist() == [[-100, 5, 6, -100], [-100, 7, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0]]


def test_packed_batch_gives_the_same_logits_as_each_conversation_alone(tok, tiny_model_dir, tmp_path):
    records = [
        r
        for r in json.loads((SFT_DATA / "alpaca.json").read_text())
        if r["instruction"] == "Give the sentence that comes next in this text."
    ]
    (tmp_path / "short.json").write_text(json.dumps(records[:12]))
    args = sft_args(
        dataset_dir=str(tmp_path),
        max_seq_length=400,
        packing=True,
        validation_split_percentage=0,
        system_prompt="",
    )
    packed = build_sft_datasets(tok, args)["train"]
    assert len(packed) < 12 and all(len(r["input_ids"]) <= 400 for r in packed)
    rows = sorted(packed, key=lambda r: -r["position_ids"].count(0))[:2]  # the two rows packing the most
    assert rows[0]["position_ids"].count(0) >= 3
    batch = SFTDataCollator(tok)(rows)
    assert "attention_mask" not in batch and (batch["labels"] == IGNORE_INDEX).any()
    for attn in ("sdpa", "eager"):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn).eval()
        with torch.no_grad():
            logits = model(**batch).logits  # (B, T, V)
            for b, row in enumerate(rows):
                starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
                for s, e in itertools.pairwise(starts):
                    alone = model(input_ids=torch.tensor([row["input_ids"][s:e]])).logits[0]
                    torch.testing.assert_close(logits[b, s:e], alone, atol=1e-4, rtol=1e-4)
            # Control: without the position-id restarts the examples do see each other.
            plain = model(input_ids=batch["input_ids"]).logits
            assert not torch.allclose(plain[0, starts[1] :], logits[0, starts[1] :], atol=1e-3)


def test_cache_is_keyed_by_content_and_tokenizer(tok, tiny_model_dir, tmp_path, caplog):
    data = tmp_path / "data"
    shutil.copytree(SFT_DATA, data, ignore=shutil.ignore_patterns("*.py", "*.md"))
    cache = tmp_path / "cache"
    args = sft_args(dataset_dir=str(data), data_cache_dir=str(cache), max_seq_length=256)

    def build(tokenizer):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="yak.sft"):
            ds = build_sft_datasets(tokenizer, args)
        return ds, "loading tokenized SFT data from cache" in caplog.text

    first, hit = build(tok)
    assert not hit and len(list(cache.iterdir())) == 1
    again, hit = build(tok)
    assert hit and again["train"]["input_ids"] == first["train"]["input_ids"]
    other = AutoTokenizer.from_pretrained(tiny_model_dir)
    other.chat_template = LLAMA2_CHAT_TEMPLATE.replace("[INST]", "[INST]  ")  # a different template: new key
    _, hit = build(other)
    assert not hit and len(list(cache.iterdir())) == 2
    with open(data / "chat.jsonl", "a") as f:
        f.write(json.dumps({"instruction": "Hi.", "output": "Hello."}) + "\n")
    changed, hit = build(tok)
    assert not hit and len(list(cache.iterdir())) == 3
    assert sum(map(len, changed.values())) == sum(map(len, first.values())) + 1


def test_validation_split_and_system_prompt(tok):
    ds = build_sft_datasets(tok, sft_args(validation_split_percentage=10, max_seq_length=2048), seed=1)
    train, val = ds["train"]["input_ids"], ds["validation"]["input_ids"]
    assert len(val) == 18 and len(train) == 162 and not {tuple(x) for x in val} & {tuple(x) for x in train}
    again = build_sft_datasets(tok, sft_args(validation_split_percentage=10, max_seq_length=2048), seed=1)
    assert again["validation"]["input_ids"] == val
    # An empty system prompt removes the <<SYS>> block from conversations without their own system message.
    no_sys = build_sft_datasets(
        tok, sft_args(validation_split_percentage=0, max_seq_length=2048, system_prompt="")
    )["train"]
    texts = [tok.decode(ids) for ids in no_sys["input_ids"]]
    with_sys = [t for t in texts if "<<SYS>>" in t]
    n_system = sum('"system"' in line for line in (SFT_DATA / "chat.jsonl").read_text().splitlines())
    assert len(with_sys) == n_system > 0 and all("You continue texts faithfully" in t for t in with_sys)
    alpaca = [t for t in texts if "[INST] Give the sentence that comes next in this text.\n" in t]
    assert alpaca and all("<<SYS>>" not in t for t in alpaca)


def test_options_are_checked(tmp_path):
    with pytest.raises(YakError, match="validation_split_percentage.*max_seq_length"):
        sft_args(validation_split_percentage=100, max_seq_length=4)
    with pytest.raises(YakError, match="does not exist"):
        build_sft_datasets(None, sft_args(dataset_dir=str(tmp_path / "missing")))
    with pytest.raises(YakError, match="no .json or .jsonl files"):
        build_sft_datasets(None, sft_args(dataset_dir=str(tmp_path)))


def test_documented_sft_after_run_pt_sh_finds_its_outputs():
    """The documented 'sh run_pt.sh' then 'ADAPTERS=... sh run_sft.sh' names the folders run_pt.sh writes."""
    import re

    out = re.search(r"^OUT=\$\{OUT:-(\S+)\}", (ROOT / "run_pt.sh").read_text(), re.MULTILINE).group(1)
    for doc in ("run_sft.sh", "docs/sft.md"):
        examples = re.findall(r'ADAPTERS="([^"]+)" (?:ba)?sh run_sft.sh', (ROOT / doc).read_text())
        assert examples and all(e == f"{out}/stage1 {out}/stage2" for e in examples), (doc, examples, out)


def test_short_sft_run_with_run_sft_sh_lowers_the_loss_on_the_training_answers(tiny_model_dir, tmp_path):
    """run_sft.sh (under sh, 1 CPU process) -> train.py --task sft on the tiny model and merged tokenizer."""
    from yak.modeling import load_base_model, load_model_and_tokenizer, resize_and_init_embeddings
    from yak.source import ModelSource

    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    alpaca = json.loads((SFT_DATA / "alpaca.json").read_text())
    chats = (SFT_DATA / "chat.jsonl").read_text().splitlines()
    (data / "alpaca.json").write_text(json.dumps(alpaca[::10], ensure_ascii=False))  # 4 per language
    (data / "chat.jsonl").write_text("\n".join(chats[::10]))  # 2 per language
    settings = {
        "BASE": tiny_model_dir, "TOKENIZER": MERGED_TINY, "DATA": data, "CACHE": tmp_path / "cache",
        "VALIDATION": 0, "OUT": out, "LORA_RANK": 8, "LORA_ALPHA": 16, "LR": 5e-3, "BATCH": 6,
        "MAX_SEQ_LENGTH": 256,
    }  # fmt: skip
    env = {**os.environ, **{k: str(v) for k, v in settings.items()}}
    cmd = ["sh", "run_sft.sh", "--max_steps", "8", "--save_strategy", "no", "--plot_loss", "false"]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-3000:]

    # The training answers' loss, before (the model as training starts from it) and after (the saved adapter).
    trained, saved_tok = load_model_and_tokenizer(ModelSource(tiny_model_dir, adapters=[out]), device="cpu")
    assert saved_tok.chat_template == LLAMA2_CHAT_TEMPLATE  # the tokenizer saved with the adapter has it
    rows = build_sft_datasets(saved_tok, sft_args(dataset_dir=str(data), max_seq_length=256,
                                                  validation_split_percentage=0))["train"]  # fmt: skip
    batch = SFTDataCollator(saved_tok)(list(rows))
    start = load_base_model(tiny_model_dir, dtype="float32", device="cpu")
    resize_and_init_embeddings(start, saved_tok, AutoTokenizer.from_pretrained(tiny_model_dir))
    with torch.no_grad():
        before, after = start.eval()(**batch).loss.item(), trained(**batch).loss.item()
    print(f"answer loss before {before:.3f}, after {after:.3f}")
    assert after < 0.7 * before, (before, after)
