"""Evaluation: metrics against hand-computed values, a rigged real model, determinism, batch-size invariance,
every task kind on the shipped tiny model, the report, and bad input caught before any model is loaded."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import sacrebleu
import torch
from conftest import HELDOUT, ROOT

from yak import YakError
from yak.evaluation import EvalArguments, evaluate, metrics
from yak.evaluation.runner import prepare
from yak.evaluation.scoring import ModelSpec, Scorer, load_model
from yak.evaluation.tasks import build_examples, builtin_tasks, load_task, rejoin_tsheg, split_options
from yak.source import ModelSource

FIXTURES = ROOT / "tests" / "data" / "eval"
RECORD_TASKS = ["tncc", "tusa", "ti_mmlu", "ti_mmlu_5shot", "bo_en", "bo_zh", "tibetan_qa"]


def _args(tmp_path, models, tasks, **kw) -> EvalArguments:
    kw.setdefault("max_length", 160)
    kw.setdefault("lm_max_bytes", 400)
    kw.setdefault("max_new_tokens", 24)
    kw.setdefault("data_root", str(FIXTURES))
    return EvalArguments(
        models=[str(m) for m in models], tasks=tasks, output_dir=str(tmp_path / kw.pop("out", "out")), **kw
    )


def _unigram_model(folder: Path, tiny_model_dir: Path, logits: torch.Tensor) -> Path:
    """A real Llama whose next-token distribution is softmax(logits) whatever the context.

    Attention and MLP outputs are zero, so the residual stream is the (all-ones) embedding; the final norm
    maps it to ones and ``lm_head`` row v is ``logits[v] / H``. Saved with the tiny model's tokenizer.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden = 8
    cfg = LlamaConfig(
        vocab_size=512,
        hidden_size=hidden,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        rms_norm_eps=1e-12,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.model.embed_tokens.weight.fill_(1.0)
        model.model.norm.weight.fill_(1.0)
        model.model.layers[0].input_layernorm.weight.fill_(1.0)
        model.model.layers[0].post_attention_layernorm.weight.fill_(1.0)
        model.lm_head.weight.copy_(logits[:, None].expand(512, hidden) / hidden)
    model.save_pretrained(folder)
    for f in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tiny_model_dir / f, folder / f)
    return folder


# -- metrics --


def test_syllable_exact_match_and_f1_by_hand():
    head = "༄༅། །རྒྱུད་འབུམ་ཁ་པ་བཞུགས་སོ། "  # Kangyur vol. 078, data/heldout
    assert metrics.syllables(head) == ["རྒྱུད", "འབུམ", "ཁ", "པ", "བཞུགས", "སོ"]
    assert metrics.exact_match("རྒྱུད་འབུམ།", "རྒྱུད་འབུམ") == 1.0
    assert metrics.exact_match("རྒྱུད་འབུམ་ཁ", "རྒྱུད་འབུམ") == 0.0
    # 2 common syllables, precision 2/3, recall 2/2 -> F1 = 0.8
    assert metrics.f1_syllables("རྒྱུད་འབུམ་ཁ", "རྒྱུད་འབུམ") == pytest.approx(0.8)
    assert metrics.f1_syllables("The Whale!", "the whale") == 1.0
    assert metrics.f1_syllables("", "རྒྱུད") == 0.0


def test_chrf_and_bleu_equal_sacrebleu_directly():
    hyp = ["the whale swam away", "红楼梦第八十一回"]
    ref = ["the white whale swam far away", "红楼梦第八十二回"]
    assert metrics.chrf_pp(hyp, ref) == sacrebleu.corpus_chrf(hyp, [ref], word_order=2).score
    assert metrics.bleu(hyp, ref, "zh") == sacrebleu.corpus_bleu(hyp, [ref], tokenize="zh").score
    assert metrics.chrf_pp(ref, ref) == pytest.approx(100.0)


def test_rejoin_tsheg_and_option_splitting():
    assert rejoin_tsheg("བྲག ཡེར པ") == "བྲག་ཡེར་པ"
    assert rejoin_tsheg("༄༅ ལྭ རིང གི རིགས") == "༄༅ ལྭ་རིང་གི་རིགས"  # no tsheg after head marks
    text = "བྱ་གླག་དང་པིང་སྐྱུར་མ།\nA ཁོ་ས\nB པིང་སྐྱུར\nC དེ་ལས\nD ང་རང"
    abcd = ["A", "B", "C", "D"]
    assert split_options(text, abcd) == ("བྱ་གླག་དང་པིང་སྐྱུར་མ།", ["ཁོ་ས", "པིང་སྐྱུར", "དེ་ལས", "ང་རང"])
    assert split_options("བྱ་གླག་དང་པིང་སྐྱུར་མ།", abcd) is None


def test_shipped_configs_load_and_fewshot_excludes_the_question():
    for name in builtin_tasks():
        if name == "tokenizer":
            continue  # needs yak.tokenizer; covered by test_tokenizer_section
        assert load_task(name, str(FIXTURES)).name == name
    cfg = load_task("ti_mmlu_5shot", str(FIXTURES))
    examples, skipped = build_examples(cfg, str(FIXTURES))
    assert skipped == 1 and len(examples) == 8  # the record without options is left out
    for ex in examples:
        question = ex.prompt.split("\n\n")[-1].split("\n")[0]
        demos = ex.prompt.split("\n\n")[:-1]
        assert len(demos) == 5 and all(not d.startswith(question + "\n") for d in demos)
    assert [e.prompt for e in build_examples(cfg, str(FIXTURES))[0]] == [e.prompt for e in examples]
    tncc_cfg = load_task("tncc", str(FIXTURES))
    tncc = build_examples(tncc_cfg, str(FIXTURES))[0]
    assert tncc[0].prompt == "Title: ཝ་མོ་དང་གཟིག་གི་གཏམ་གླེང\nTopic:"  # tsheg rejoined
    tncc_cfg.num_fewshot = 2  # demonstrations from the train split, each with its gold label
    train = [json.loads(x) for x in (FIXTURES / "tncc-title" / "train.jsonl").open()]
    shots = [f"Title: {rejoin_tsheg(r['text'])}\nTopic: {r['label']}" for r in train]
    demos = build_examples(tncc_cfg, str(FIXTURES))[0][0].prompt.split("\n\n")
    assert len(demos) == 3 and all(d in shots for d in demos[:2]) and demos[2] == tncc[0].prompt


# -- a rigged real model: hand-computed bits per byte and accuracy --


def test_bits_per_byte_of_a_known_distribution_any_stride_any_batch(tmp_path, tiny_model_dir):
    logits = torch.randn(512, generator=torch.Generator().manual_seed(0)) * 2
    folder = _unigram_model(tmp_path / "unigram", tiny_model_dir, logits)
    model, tok = load_model(ModelSpec("unigram", ModelSource(folder)))
    logp = torch.log_softmax(logits.double(), -1)
    texts = [
        (HELDOUT / name).read_text(encoding="utf-8")[:120]
        for name in (
            "bo_modern_nanhai_deseg_heldout.txt",
            "en_moby_dick_heldout.txt",
            "zh_hongloumeng_ch81-120_heldout.txt",
        )
    ]
    for text in texts:
        ids = tok(text, add_special_tokens=False).input_ids
        expected_bits = -sum(logp[i].item() for i in ids) / math.log(2)  # each token once, context-free model
        for stride, batch in ((63, 1), (20, 4), (5, 16)):
            scorer = Scorer(model, tok, max_length=64, batch_size=batch)
            ((nll, n),) = scorer.rolling_nll([text], stride)
            assert n == len(ids)
            bpb = metrics.bits_per_unit(nll, len(text.encode("utf-8")))
            assert bpb == pytest.approx(expected_bits / len(text.encode("utf-8")), rel=1e-5)


def test_accuracy_of_a_rigged_model(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    logits = torch.zeros(512)
    # " B" is the one token "▁B" ( " A", " C", " D" are "▁" + letter): the model always answers B
    logits[AutoTokenizer.from_pretrained(tiny_model_dir).convert_tokens_to_ids("▁B")] = 30.0
    folder = _unigram_model(tmp_path / "rigged_b", tiny_model_dir, logits)
    res = evaluate(_args(tmp_path, [folder], ["ti_mmlu"]))
    preds = [json.loads(line) for line in (tmp_path / "out/predictions/rigged_b/ti_mmlu.jsonl").open()]
    golds = [p["gold"] for p in preds]
    assert all(p["pred"] == 1 for p in preds)
    assert res["results"]["rigged_b"]["ti_mmlu"]["accuracy"] == pytest.approx(
        100 * golds.count(1) / len(golds)
    )
    assert res["results"]["rigged_b"]["ti_mmlu"]["skipped"] == 1


# -- every task kind on the tiny model: determinism, batch size, report --


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("full")
    tasks = ["heldout"] + RECORD_TASKS
    res = evaluate(_args(tmp, [tiny_model_dir], tasks, batch_size=4))
    return tmp, res


def test_every_task_kind_on_the_tiny_model(full_run):
    tmp, res = full_run
    r = res["results"]["stories260K"]
    for stem in ("bo_modern_nanhai_deseg_heldout", "en_moby_dick_heldout", "zh_hongloumeng_ch81-120_heldout"):
        assert 0 < r["heldout"][f"{stem}/bits_per_byte"] < 40
        assert r["heldout"][f"{stem}/bits_per_char"] >= r["heldout"][f"{stem}/bits_per_byte"]
    assert r["tncc"]["n"] == 8 and r["tncc"]["chance"] == pytest.approx(100 / 12)
    assert 0 < r["ti_mmlu_5shot"]["truncated"] <= r["ti_mmlu_5shot"]["n"]  # 5 Tibetan shots overflow 160 tokens
    assert set(r["bo_zh"]) >= {"chrf++", "bleu"} and set(r["tibetan_qa"]) >= {"exact_match", "f1"}
    out = tmp / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        ".yak_manifest.json",  # the files evaluate.py wrote: what --overwrite may delete
        "predictions",
        "results.json",
        "results.md",
        "results.png",
    ]
    assert json.loads((out / "results.json").read_text())["results"] == json.loads(json.dumps(res["results"]))
    table = (out / "results.md").read_text()
    assert "| task | metric | stories260K |" in table and "| tncc (n=8, chance 8) | accuracy |" in table
    preds = [json.loads(x) for x in (out / "predictions/stories260K/bo_en.jsonl").open()]
    assert len(preds) == 6 and all("\n" not in p["prediction"] for p in preds)
    assert sum(t["seconds"] for t in r.values()) < 120


def _strip_timing(res):
    return {
        m: {t: {k: v for k, v in r.items() if k != "seconds"} for t, r in per.items()}
        for m, per in res["results"].items()
    }


def test_same_numbers_twice_and_batch_size_invariance(full_run, tmp_path, tiny_model_dir):
    _, first = full_run
    tasks = ["heldout", "tusa", "ti_mmlu", "bo_en"]
    again = _strip_timing(evaluate(_args(tmp_path, [tiny_model_dir], tasks, batch_size=4, out="again")))
    ref = {t: v for t, v in _strip_timing(first)["stories260K"].items() if t in tasks}
    assert again["stories260K"] == ref  # bit-identical on a rerun
    one = _strip_timing(evaluate(_args(tmp_path, [tiny_model_dir], tasks, batch_size=1, out="b1")))[
        "stories260K"
    ]
    for task, values in ref.items():
        for k, v in values.items():
            assert one[task][k] == pytest.approx(v, rel=1e-4, abs=1e-4), (task, k)


def test_two_models_side_by_side(tmp_path, tiny_model_dir):
    folder = _unigram_model(tmp_path / "uniform", tiny_model_dir, torch.zeros(512))
    res = evaluate(_args(tmp_path, [f"tiny={tiny_model_dir}", folder], ["heldout", "tusa"], lm_max_bytes=200))
    assert list(res["results"]) == ["tiny", "uniform"]
    table = (tmp_path / "out/results.md").read_text()
    assert "| task | metric | tiny | uniform |" in table
    # a uniform model pays log2(512) = 9 bits per token
    r = res["results"]["uniform"]["heldout"]
    assert r["en_moby_dick_heldout/bits_per_byte"] == pytest.approx(
        9 * r["en_moby_dick_heldout/tokens_per_byte"]
    )


def test_base_model_with_a_stage1_adapter(tmp_path, tiny_model_dir):
    from yak.modeling import load_base_model, load_tokenizer, resize_and_init_embeddings, save_embeddings

    merged = ROOT / "tokenizer" / "stories260K_bo" / "merged_tokenizer_hf"
    model = load_base_model(tiny_model_dir, device="cpu")
    tokenizer = load_tokenizer(merged)
    resize_and_init_embeddings(model, tokenizer, load_tokenizer(tiny_model_dir))
    save_embeddings(model, tmp_path / "stage1", str(tiny_model_dir))
    tokenizer.save_pretrained(tmp_path / "stage1")
    res = evaluate(
        _args(tmp_path, [tiny_model_dir, f"bo={tiny_model_dir},{tmp_path / 'stage1'}"], ["heldout"])
    )
    key = "bo_modern_nanhai_deseg_heldout/tokens_per_byte"
    assert res["results"]["stories260K"]["heldout"][key] == pytest.approx(1.0, abs=0.01)  # byte fallback
    assert res["results"]["bo"]["heldout"][key] < 0.5  # the merged tokenizer's Tibetan pieces
    with pytest.raises(YakError, match="model bad: adapter folder .*nowhere does not exist"):
        prepare(_args(tmp_path, [f"bad={tiny_model_dir},{tmp_path / 'nowhere'}"], ["heldout"]))


def test_chat_template_wraps_prompts(tmp_path, tiny_model_dir):
    from yak.template import LLAMA2_CHAT_TEMPLATE

    model, tok = load_model(ModelSpec("tiny", ModelSource(tiny_model_dir)))
    with pytest.raises(YakError, match="no chat_template"):
        Scorer(model, tok, 64, chat_template=True)
    tok.chat_template = LLAMA2_CHAT_TEMPLATE
    scorer = Scorer(model, tok, 160, chat_template=True)
    ids = scorer.encode_prompt("Title: x")
    assert ids.count(tok.bos_token_id) == 1 and tok.decode(ids).endswith("Title: x [/INST]")
    # a choice is scored where the answer goes, after [/INST]: it was put inside the user message, and the
    # tokens scored were the template's own "/INST]"
    prompt = "Review: good\nSentiment:"
    (got,), _ = scorer.loglikelihoods([(prompt, " positive")])
    ids, whole = scorer.encode_prompt(prompt), scorer.encode_prompt(prompt, " positive")
    assert whole[: len(ids)] == ids and tok.decode(whole[len(ids) :]).strip() == "positive"
    with torch.no_grad():
        logp = model(torch.tensor([whole])).logits[0].float().log_softmax(-1)
    assert got == pytest.approx(sum(logp[i - 1, whole[i]].item() for i in range(len(ids), len(whole))), abs=1e-4)
    # documents are scored as plain text: the template's tokens would add to the bits of the document's bytes
    text = sorted(HELDOUT.glob("*.txt"))[0].read_text(encoding="utf-8")[:300]
    plain, chat = (Scorer(model, tok, 64, chat_template=c).rolling_nll([text], 32) for c in (False, True))
    assert chat == plain


def test_tokenizer_section(tmp_path, tiny_model_dir):
    res = evaluate(_args(tmp_path, [tiny_model_dir], ["tokenizer"]))["results"]["stories260K"]["tokenizer"]
    for stem in ("bo_classical_kangyur_vol078_heldout", "bo_modern_nanhai_deseg_heldout"):
        r = {k.split("/")[1]: v for k, v in res.items() if k.startswith(stem + "/")}
        # stories260K has no Tibetan piece: one byte token per UTF-8 byte, plus the "▁" prefix of each line
        assert r["tokens"] == r["bytes"] + r["texts"]
        assert 4 < r["reference_tokens_per_syllable"] < 8  # Llama 2: about 5.6 (mostly byte fallback)
        assert r["length_reduction"] == pytest.approx(1 - r["tokens"] / r["reference_tokens"])
    assert (
        "| tokenizer | bo_modern_nanhai_deseg_heldout/tokens_per_syllable ↓ |"
        in (tmp_path / "out" / "results.md").read_text()
    )


# -- bad input --


def test_problems_are_listed_before_any_model_is_loaded(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "results.md").write_text("an earlier report")
    with pytest.raises(YakError) as e:
        prepare(_args(tmp_path, [tmp_path / "no_model"], ["no_such_task", "tncc"], data_root=str(tmp_path)))
    msg = str(e.value)
    assert "no_model" in msg and "no_such_task" in msg and "tncc-title/validation.jsonl does not exist" in msg
    assert "out already exists" in msg


def test_output_dir_that_is_a_model_folder_is_refused(tmp_path, tiny_model_dir):
    """With --overwrite the atomic rename would replace the model folder by the report."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    for out in ("model", "."):
        with pytest.raises(YakError, match=r"is \(or contains\) the model folder"):
            prepare(_args(tmp_path, [model], ["tusa"], out=out, overwrite=True))
    assert (model / "config.json").is_file()


def test_records_missing_fields_and_unknown_keys(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "རྒྱུད་འབུམ།", "label": "Positive"}\n{"txt": "བཞུགས་སོ།"}\n', encoding="utf-8")
    cfg = tmp_path / "mine.yaml"
    cfg.write_text(f"kind: classification\ntest: {data}\nprompt: '{{text}}'\nchoices: [Positive, Negative]\n")
    with pytest.raises(YakError, match=r"record 2 lacks field\(s\) label, text"):
        load_task(str(cfg))
    cfg.write_text(f"kind: classification\ntest: {data}\nprompt: x\nchoices: [a]\nnum_shots: 3\n")
    with pytest.raises(YakError, match="unknown key 'num_shots'"):
        load_task(str(cfg))


def test_task_yaml_mistakes_are_listed_not_tracebacks(tmp_path):
    data = FIXTURES / "tusa" / "validation.jsonl"
    cfg = tmp_path / "mine.yaml"
    cfg.write_text(f"kind: classification\ntest: {data}\nprompt: '{{text'\ntarget: ' x'\nnum_fewshot: '3'\n"
                   "normalize: text\nchoices: [Positive, Negative]\n")
    with pytest.raises(YakError) as e:
        load_task(str(cfg))
    for part in ("'num_fewshot' must be an integer, found '3'", "'normalize' must be a mapping of strings",
                 "prompt '{text' is not a valid template", "target ' x' must contain {choice}"):
        assert part in str(e.value)
    cfg.write_text("kind: language_modelling\nfiles: 3\nstride: true\n")
    with pytest.raises(YakError, match="'files' must be a list of strings, found 3; 'stride' must be an integer"):
        load_task(str(cfg))
    cfg.write_text(f"kind: classification\ntest: {data}\nprompt: 'Review: {{0}}'\nchoices: [Positive, Negative]\n")
    with pytest.raises(YakError, match=r"name the fields, e.g. \{text\}"):
        load_task(str(cfg))
    cfg.write_text(f"kind: generation\ntest: {FIXTURES}/parallel/bo-en.dev.jsonl\nprompt: '{{bo}}'\n"
                   "reference_field: tgt\nmetrics: [bleu]\nbleu_tokenize: chinese\n")
    with pytest.raises(YakError, match="bleu_tokenize 'chinese' is not one of sacrebleu's"):  # was a KeyError
        load_task(str(cfg))  # once every model had generated its answers
    for name in ("../../elsewhere", "tusa: mine"):  # a path out of predictions/; a chart panel never found
        cfg.write_text(f"name: '{name}'\nkind: language_modelling\nfiles: {HELDOUT}/*.txt\n")
        with pytest.raises(YakError, match="use letters, digits"):
            load_task(str(cfg))


def test_max_length_over_the_model_context_is_refused(tmp_path, tiny_model_dir):
    """stories260K knows 512 positions; a 2048-token window ran past them silently (no error, wrong bits)."""
    with pytest.raises(YakError, match="--max_length 2048 is over model stories260K's context of 512"):
        prepare(_args(tmp_path, [tiny_model_dir], ["heldout"], max_length=2048))


def test_fewshot_file_is_needed_only_when_examples_are_drawn(tmp_path, tiny_model_dir):
    """tusa's few-shot file (train.jsonl) is read only when shots are asked for: without it a zero-shot run
    works (it crashed with FileNotFoundError, issue 13 case 11), and --num_fewshot 2 is refused up front
    naming the file."""
    root = tmp_path / "root"
    shutil.copytree(FIXTURES / "tusa", root / "tusa")
    (root / "tusa" / "train.jsonl").unlink()
    for shots in (None, 0):  # the task's own num_fewshot (0), and given
        res = evaluate(_args(tmp_path, [tiny_model_dir], ["tusa"], data_root=str(root), num_fewshot=shots,
                             out=f"out{shots}"))
        assert res["results"]["stories260K"]["tusa"]["n"] > 0
    for shots, message in [(2, "fewshot data file .*train.jsonl does not exist"), (-1, "num_fewshot must be >= 0")]:
        with pytest.raises(YakError, match=message):
            prepare(_args(tmp_path, [tiny_model_dir], ["tusa"], data_root=str(root), num_fewshot=shots))
    cfg = load_task("tusa", str(root))
    cfg.num_fewshot = 2  # e.g. the file went away after the check
    with pytest.raises(YakError, match="num_fewshot=2 draws examples from .*train.jsonl, which does not exist"):
        build_examples(cfg, str(root))


def test_unloadable_model_leaves_no_output(tmp_path, tiny_model_dir):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not weights")
    # found before any model loads (was a load failure after the first model had run)
    with pytest.raises(YakError, match="model broken: .*broken/model.safetensors cannot be read"):
        evaluate(_args(tmp_path, [tiny_model_dir, broken], ["tusa"]))
    assert not (tmp_path / "out").exists()


def test_script_help_and_clean_error_exit(tmp_path):
    run = subprocess.run(
        [sys.executable, "evaluate.py", "--help"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert run.returncode == 0 and "bits per UTF-8 byte" in run.stdout
    run = subprocess.run(
        [sys.executable, "evaluate.py", "--models", str(tmp_path), "--tasks", "nope"],
        cwd=ROOT,
        capture_output=True,
        check=False,
        text=True,
    )
    assert run.returncode == 2 and "unknown task 'nope'" in run.stderr and "Traceback" not in run.stderr
