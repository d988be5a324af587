"""GGUF export: llama.cpp's converter and quantizer on a merged tiny model, checked by llama.cpp itself
(llama-cpp-python) and by transformers' independent GGUF reader against the Hugging Face model."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.conftest import HELDOUT, ROOT
from yak import YakError
from yak.gguf import GGUFArguments, export_gguf, llama_cpp_sources, tokenizer_mismatches
from yak.merge import MergeArguments, merge
from yak.source import ModelSource

F16_TOLERANCE = 0.03  # of the largest logit: llama.cpp computes with f16 weights and activations


def heldout_lines() -> dict[str, list[str]]:
    """Held-out Tibetan (classical and modern), English, Chinese, and mixed Tibetan + English lines."""

    def read(name, n, cut):
        return [t[:cut] for t in (HELDOUT / name).read_text(encoding="utf-8").splitlines() if len(t) > 20][:n]

    bo = read("bo_classical_kangyur_vol078_heldout.txt", 15, 300) + read("bo_modern_nanhai_deseg_heldout.txt",
                                                                          15, 300)
    en = read("en_moby_dick_heldout.txt", 30, 300)
    return {"bo": bo, "en": en, "zh": read("zh_hongloumeng_ch81-120_heldout.txt", 5, 200),
            "mixed": [f"{b[:80]} {e}" for b, e in zip(bo, en)]}


def test_export_script_help():
    done = subprocess.run([sys.executable, str(ROOT / "export_gguf.py"), "--help"], capture_output=True, check=False,
                          text=True, cwd=ROOT)
    assert done.returncode == 0 and "--llama_cpp_dir" in done.stdout and "q4_0" in done.stdout


def test_bad_export_inputs_are_reported(tmp_path):
    with pytest.raises(YakError, match="expected a llama.cpp checkout"):
        llama_cpp_sources(tmp_path)
    with pytest.raises(YakError) as e:
        export_gguf(GGUFArguments(model_dir=str(tmp_path), output_dir=str(tmp_path / "o"), outtype="f8",
                                  check_file=str(tmp_path / "missing.txt")))
    assert all(s in str(e.value) for s in ("no config.json", "no tokenizer files", "--outtype", "--check_file"))
    assert not (tmp_path / "o").exists()


def test_missing_llama_cpp_python_and_unknown_quant_types_are_reported_before_converting(tiny_model_dir, tmp_path,
                                                                                       monkeypatch):
    """run_merge_export.sh passes --check_file: without llama-cpp-python that was a traceback after the
    conversion and quantization; an unknown --quant_types failed only after the (long) conversion too."""
    check = HELDOUT / "bo_modern_nanhai_deseg_heldout.txt"
    monkeypatch.setenv("PATH", str(tmp_path))  # no llama-quantize binary
    if importlib.util.find_spec("llama_cpp") is not None:
        with pytest.raises(YakError, match="--quant_types: unknown q4_x"):
            export_gguf(GGUFArguments(model_dir=str(tiny_model_dir), output_dir=str(tmp_path / "o"),
                                      quant_types="q4_0,q4_x", llama_cpp_dir=str(tmp_path / "no_llama_cpp")))
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # what `import llama_cpp` meets when it is not installed
    with pytest.raises(YakError) as e:
        export_gguf(GGUFArguments(model_dir=str(tiny_model_dir), output_dir=str(tmp_path / "o"),
                                  check_file=str(check), llama_cpp_dir=str(tmp_path / "no_llama_cpp")))
    for part in ("--check_file needs llama-cpp-python", "needs llama.cpp's llama-quantize",
                 "no_llama_cpp: expected a llama.cpp checkout"):
        assert part in str(e.value)
    with pytest.raises(YakError, match="--quant_types f16 is the --outtype file itself"):  # would read and write
        export_gguf(GGUFArguments(model_dir=str(tiny_model_dir), output_dir=str(tmp_path / "o"), quant_types="f16"))
    assert not (tmp_path / "o").exists()


def test_output_dir_that_is_the_model_dir_is_refused(tiny_model_dir, tmp_path):
    """With --overwrite, the atomic rename would replace the merged model by the GGUF files."""
    import shutil

    model = tmp_path / "merged"
    shutil.copytree(tiny_model_dir, model)
    for out in (model, tmp_path):
        with pytest.raises(YakError, match=r"is \(or contains\) the model folder"):
            export_gguf(GGUFArguments(model_dir=str(model), output_dir=str(out), overwrite=True,
                                      llama_cpp_dir=str(tmp_path / "no_llama_cpp")))
    assert (model / "config.json").is_file()


def _skip_without_llama_cpp() -> None:
    """Skip where llama.cpp is not set up (docs/export.md): its runtime, and the pinned converter sources, which
    the export never downloads."""
    pytest.importorskip("llama_cpp", reason="needs llama-cpp-python (pip install -r requirements-gguf.txt)")
    try:
        llama_cpp_sources()
    except YakError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def exported(tiny_model_dir, tmp_path_factory):
    """stories260K + a real peft adapter on the shipped merged tokenizer (3,512 tokens -> 3,520 rows), merged,
    converted to f16 GGUF and quantized to q4_0, with llama.cpp's tokenization checked on held-out lines."""
    from tests.test_merge import tied_adapter

    _skip_without_llama_cpp()
    work = tmp_path_factory.mktemp("gguf")
    adapter, _, _ = tied_adapter(tiny_model_dir, work / "adapter", ensure_weight_tying=True)
    merged = merge(ModelSource(base_model=str(tiny_model_dir), adapters=str(adapter)),
                   MergeArguments(output_dir=str(work / "merged")))
    check = work / "check.txt"
    check.write_text("\n".join(t for lines in heldout_lines().values() for t in lines), encoding="utf-8")
    files = export_gguf(GGUFArguments(model_dir=str(merged), output_dir=str(work / "gguf"), quant_types="q4_0",
                                      check_file=str(check)))
    return merged, {f.stem.rsplit("-", 1)[1]: f for f in files}


@pytest.mark.slow
def test_llama_cpp_tokenizes_as_hugging_face(exported):
    merged, files = exported
    for lines in heldout_lines().values():
        assert len(lines) >= 5
        assert tokenizer_mismatches(files["f16"], merged, lines) == []


@pytest.mark.slow
def test_llama_cpp_f16_logits_and_greedy_generation_match(exported):
    import llama_cpp
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged, files = exported
    tok = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    lines = heldout_lines()
    with contextlib.closing(llama_cpp.Llama(str(files["f16"]), logits_all=True, n_ctx=256, verbose=False)) as llm:
        assert llm.n_vocab() == 3520
        for text in (lines["bo"][0][:100], lines["en"][0], lines["mixed"][0][:120]):
            ids = tok.encode(text)
            with torch.no_grad():
                want = model(torch.tensor([ids])).logits[0].numpy()  # (T, V)
            llm.reset()
            llm.eval(ids)
            got = np.asarray(llm.scores[: len(ids)])
            # llama.cpp rounds weights and activations to f16: 0.15-0.33 apart at logits of about 20, from run to
            # run; a wrong tensor or token mapping is several units off
            assert np.abs(got - want).max() < F16_TOLERANCE * np.abs(want).max(), text
        ids = tok.encode("Once upon a time")
        with torch.no_grad():
            want = model.generate(torch.tensor([ids]), max_new_tokens=30, do_sample=False)[0, len(ids):].tolist()
        llm.reset()
        got = []
        for t in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0):
            got.append(t)
            if len(got) == len(want) or t == llm.token_eos():
                break
        # every token llama.cpp picks greedily is a best next token for the Hugging Face model too, up to the f16
        # error above (where two tokens nearly tie, f16 rounding may pick the other, and the paths part)
        assert len(got) == len(want) or got[-1] == llm.token_eos()
        with torch.no_grad():
            logits = model(torch.tensor([ids + got])).logits[0, len(ids) - 1 : -1]  # (len(got), V)
        shortfall = logits.max(-1).values - logits.gather(1, torch.tensor(got)[:, None])[:, 0]
        assert shortfall.max() < F16_TOLERANCE * logits.abs().max(), (shortfall, got, want)


@pytest.mark.slow
def test_q4_0_file_loads_and_generates(exported):
    import llama_cpp

    _, files = exported
    assert files["q4_0"].stat().st_size < 0.7 * files["f16"].stat().st_size
    with contextlib.closing(llama_cpp.Llama(str(files["q4_0"]), n_ctx=128, verbose=False)) as llm:
        text = llm.create_completion("Once upon a time", max_tokens=12, temperature=0)["choices"][0]["text"]
    assert len(text.split()) >= 3


@pytest.mark.slow
def test_transformers_reads_the_f16_gguf(exported):
    """An independent reader: transformers' GGUF loader gives back the merged model's logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged, files = exported
    tok = AutoTokenizer.from_pretrained(merged)
    ours = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    theirs = AutoModelForCausalLM.from_pretrained(files["f16"].parent, gguf_file=files["f16"].name,
                                                  dtype=torch.float32).eval()
    assert theirs.config.vocab_size == 3520
    ids = torch.tensor([tok.encode(heldout_lines()["mixed"][1][:150])])
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids).logits, atol=0.15, rtol=0)


@pytest.mark.slow
def test_run_merge_export_script(tiny_model_dir, tmp_path):
    """The shipped shell script, end to end on the tiny model: merge, f16 GGUF, q4_0, tokenizer check."""
    from tests.test_merge import tied_adapter

    _skip_without_llama_cpp()
    adapter, _, _ = tied_adapter(tiny_model_dir, tmp_path / "adapter", ensure_weight_tying=True)
    env = {"base_model": str(tiny_model_dir), "lora_model": str(adapter), "output_dir": str(tmp_path / "hf"),
           "pth_dir": "", "GGUF": "1", "gguf_dir": str(tmp_path / "gguf"), "output_dtype": "float32",
           "check_file": str(HELDOUT / "bo_classical_kangyur_vol078_heldout.txt")}
    done = subprocess.run(["sh", "run_merge_export.sh"], cwd=ROOT, capture_output=True, check=False, text=True,
                          env={**os.environ, **env})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "llama.cpp equals Hugging Face on 177/177 lines" in done.stderr
    assert sorted(p.name for p in (tmp_path / "gguf").iterdir()) == ["hf-f16.gguf", "hf-q4_0.gguf"]


@pytest.mark.slow
def test_meta_pth_output_gives_the_same_gguf(tiny_model_dir, exported):
    """llama.cpp's converter for Meta checkpoints, run on the pth output (2 model-parallel parts), gives the
    same tensors as its Hugging Face converter on the Hugging Face output: an independent check of the Meta
    names, splits and q/k permutation."""
    from gguf import GGUFReader

    merged, files = exported
    pth = merge(ModelSource(base_model=str(tiny_model_dir), adapters=str(merged.parent / "adapter")),
                MergeArguments(output_dir=str(merged.parent / "pth"), output_type="pth", num_shards=2))
    src = llama_cpp_sources()
    out = merged.parent / "from-pth.gguf"
    done = subprocess.run([sys.executable, str(src / "examples" / "convert_legacy_llama.py"), str(pth),
                           "--outfile", str(out), "--outtype", "f16", "--pad-vocab"], capture_output=True, check=False, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    from_pth = {t.name: np.array(t.data) for t in GGUFReader(out).tensors}
    from_hf = {t.name: np.array(t.data) for t in GGUFReader(files["f16"]).tensors}
    from_hf["output.weight"] = from_hf["token_embd.weight"]  # tied in Hugging Face, written out by Meta
    assert sorted(from_pth) == sorted(from_hf)
    for name, t in from_hf.items():
        assert np.array_equal(from_pth[name], t), name
