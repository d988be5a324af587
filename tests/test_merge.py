"""Low-memory merge: equals peft's merge_and_unload() on real adapters, Meta .pth round trip, bad input."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from tests.conftest import HELDOUT, ROOT
from yak import YakError
from yak.formats import padded_vocab_size as pad_vocab
from yak.merge import MergeArguments, merge, meta_params
from yak.source import ModelSource

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def real_lines(n: int = 2) -> list[str]:
    """Held-out Tibetan, English and Chinese lines, cut short to keep the tiny model fast."""
    lines = []
    for name in ("bo_modern_nanhai_deseg_heldout.txt", "en_moby_dick_heldout.txt",
                 "zh_hongloumeng_ch81-120_heldout.txt"):
        text = [t for t in (HELDOUT / name).read_text(encoding="utf-8").splitlines() if len(t) > 40]
        lines += [t[:120] for t in text[:n]]
    return lines


def merged_tokenizer(root: Path, out: Path):
    """The shipped tiny merged tokenizer (stories260K's 512 pieces + Tibetan pieces), copied to ``out``."""
    shutil.copytree(root / "tokenizer" / "stories260K_bo" / "merged_tokenizer_hf", out, dirs_exist_ok=True)
    return AutoTokenizer.from_pretrained(out)


def randomize_adapter(model, seed: int) -> None:
    """Make every LoRA B and every modules_to_save copy non-trivial, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            elif "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def make_adapter(model, out: Path, seed: int, tokenizer=None, safe=True, save_embedding_layers=False,
                 modules_to_save=("embed_tokens", "lm_head"), **lora):
    """peft adapter on ``model`` (in place), randomized and saved as training saves it (docs/formats.md)."""
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, modules_to_save=list(modules_to_save), **lora)
    peft_model = get_peft_model(model, cfg)
    randomize_adapter(peft_model, seed)
    peft_model.save_pretrained(out, safe_serialization=safe, save_embedding_layers=save_embedding_layers)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return peft_model


def merged_state(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [
        "model.safetensors"]
    out = {}
    for f in files:
        with safe_open(str(folder / f), "pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


def assert_same_weights(merged: dict, reference: torch.nn.Module, atol=1e-6):
    ref = {k: v for k, v in reference.state_dict().items() if "rotary" not in k}
    if reference.config.tie_word_embeddings and "lm_head.weight" not in merged:
        ref.pop("lm_head.weight")
    assert sorted(merged) == sorted(ref)
    for k, v in ref.items():
        torch.testing.assert_close(merged[k].float(), v.float(), atol=atol, rtol=0, msg=k)


def logits(model, tok, lines) -> list[torch.Tensor]:
    model.eval()
    with torch.no_grad():
        return [model(**tok(t, return_tensors="pt")).logits[0] for t in lines]


def tied_adapter(tiny_model_dir: Path, out: Path, ensure_weight_tying: bool, **save):
    """A real peft adapter on stories260K (tied) with its vocabulary resized for the merged tokenizer."""
    tok = merged_tokenizer(ROOT, out)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.resize_token_embeddings(pad_vocab(len(tok)), mean_resizing=False)
    peft_model = make_adapter(model, out, seed=0, tokenizer=tok, ensure_weight_tying=ensure_weight_tying, **save)
    return out, peft_model, tok


@pytest.fixture(scope="module")
def resized_adapter(tiny_model_dir, tmp_path_factory):
    """The adapter as stage 2 writes it for a tied model (docs/formats.md: ensure_weight_tying)."""
    return tied_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter"), ensure_weight_tying=True)


@pytest.mark.parametrize("tying", ["ensure_weight_tying", "separate copies"])
def test_merge_equals_peft_merge_and_unload_resized_tied(tiny_model_dir, resized_adapter, tmp_path, tying):
    if tying == "ensure_weight_tying":
        adapter, peft_model, tok = resized_adapter
    else:  # peft's default: embed_tokens and lm_head trained as two copies (and its extra embedding keys)
        adapter, peft_model, tok = tied_adapter(tiny_model_dir, tmp_path / "adapter", False,
                                                save_embedding_layers=True)
    out = merge(ModelSource(base_model=str(tiny_model_dir), adapters=str(adapter)),
                MergeArguments(output_dir=str(tmp_path / "merged"), max_shard_size="100KB"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3  # several shards, each written as it went
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == pad_vocab(len(tok)) == 3520
    assert config["tie_word_embeddings"] is (tying == "ensure_weight_tying")
    state = merged_state(out)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())

    lines = real_lines()
    tok = AutoTokenizer.from_pretrained(adapter)  # as saved with the adapter
    expected = logits(peft_model, tok, lines)  # base + adapter, unmerged
    reference = peft_model.merge_and_unload(safe_merge=True)
    assert_same_weights(state, reference)
    merged_model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    merged_tok = AutoTokenizer.from_pretrained(out)
    assert [merged_tok.encode(t) for t in lines] == [tok.encode(t) for t in lines]
    for got, want in zip(logits(merged_model, merged_tok, lines), expected):
        # merged x @ (W + s B A) vs unmerged x @ W + s (x @ A) @ B: fp32 summation order differs (seen: 1.4e-4)
        torch.testing.assert_close(got, want, atol=5e-4, rtol=1e-4)
    if tying == "ensure_weight_tying":  # the format training writes (docs/formats.md)
        # the toolkit's own loader of training outputs (yak.modeling) gives the same model
        from yak.modeling import load_model_and_tokenizer

        loaded, loaded_tok = load_model_and_tokenizer(ModelSource(tiny_model_dir, adapters=[adapter], dtype="float32"), device="cpu")
        for got, want in zip(logits(loaded, loaded_tok, lines), expected):
            torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-4)  # float32 rounding; logits near 20


def test_tied_model_with_only_embed_tokens_trained_keeps_the_original_output_layer(tiny_model_dir, tmp_path):
    """peft leaves a tied lm_head on the original matrix when only embed_tokens is in modules_to_save."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    peft_model = make_adapter(model, tmp_path / "adapter", seed=3, modules_to_save=["embed_tokens"])
    out = merge(ModelSource(base_model=str(tiny_model_dir), adapters=str(tmp_path / "adapter")),
                MergeArguments(output_dir=str(tmp_path / "merged")))
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    assert_same_weights(merged_state(out), peft_model.merge_and_unload())


def test_merge_stage1_alone_tied(tiny_model_dir, tmp_path):
    """A stage-1 output (trained embeddings, tied) merges into a tied model with the new vocabulary."""
    stage1 = tmp_path / "stage1"
    tok = merged_tokenizer(ROOT, stage1)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.resize_token_embeddings(pad_vocab(len(tok)), mean_resizing=False)
    with torch.no_grad():
        model.model.embed_tokens.weight.add_(torch.randn_like(model.model.embed_tokens.weight) * 0.05)
    save_file({"model.embed_tokens.weight": model.model.embed_tokens.weight.contiguous()},
              stage1 / "embeddings.safetensors")
    (stage1 / "yak_adapter.json").write_text(json.dumps(
        {"format": "yak-embeddings", "version": 1, "base_model_name_or_path": str(tiny_model_dir),
         "vocab_size": 3520, "tie_word_embeddings": True}))
    out = merge(ModelSource(base_model=str(tiny_model_dir), adapters=str(stage1), dtype="bfloat16"),
                MergeArguments(output_dir=str(tmp_path / "merged")))
    config = json.loads((out / "config.json").read_text())
    assert (config["vocab_size"], config["tie_word_embeddings"], config["dtype"]) == (3520, True, "bfloat16")
    state = merged_state(out)
    assert "lm_head.weight" not in state
    assert all(t.dtype == torch.bfloat16 for t in state.values())
    assert_same_weights(state, model.to(torch.bfloat16), atol=0)


def untied_base(folder: Path) -> LlamaForCausalLM:
    """A tiny untied GQA Llama saved as sharded .bin files with an index (the original script's input)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=88, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False,
                      max_position_embeddings=128)
    model = LlamaForCausalLM(cfg)
    model.config.save_pretrained(folder)
    # transformers 5 writes only safetensors: write .bin shards and their index as older checkpoints have
    state = model.state_dict()
    names = sorted(state)
    weight_map = {}
    for i in range(3):
        shard = {k: state[k].clone() for k in names[i::3]}
        torch.save(shard, folder / f"pytorch_model-0000{i + 1}-of-00003.bin")
        weight_map.update(dict.fromkeys(shard, f"pytorch_model-0000{i + 1}-of-00003.bin"))
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(t.numel() * 4 for t in state.values())}, "weight_map": weight_map}))
    return model


def test_merge_stage1_then_two_adapters_from_bin_shards(tiny_model_dir, tmp_path):
    """base (.bin shards) -> stage 1 (untied) -> CPT adapter (.bin) -> SFT adapter, against peft in sequence."""
    base = untied_base(tmp_path / "base")
    stage1 = tmp_path / "stage1"
    tok = merged_tokenizer(ROOT, stage1)
    model = LlamaForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    model.resize_token_embeddings(pad_vocab(len(tok)), mean_resizing=False)
    with torch.no_grad():
        for m in (model.model.embed_tokens, model.lm_head):
            m.weight.add_(torch.randn_like(m.weight) * 0.05)
    save_file({"model.embed_tokens.weight": model.model.embed_tokens.weight.contiguous(),
               "lm_head.weight": model.lm_head.weight.contiguous()}, stage1 / "embeddings.safetensors")
    (stage1 / "yak_adapter.json").write_text(json.dumps(
        {"format": "yak-embeddings", "version": 1, "base_model_name_or_path": "base", "vocab_size": 3520,
         "tie_word_embeddings": False}))
    cpt = make_adapter(model, tmp_path / "cpt", seed=1, safe=False, use_rslora=True,
                       alpha_pattern={"down_proj": 16}).merge_and_unload()
    assert (tmp_path / "cpt" / "adapter_model.bin").is_file()
    sft = make_adapter(cpt, tmp_path / "sft", seed=2, tokenizer=tok)
    lines = real_lines(1)
    expected = logits(sft, tok, lines)
    reference = sft.merge_and_unload()
    out = merge(ModelSource(base_model=str(tmp_path / "base"),
                            adapters=f"{stage1},{tmp_path / 'cpt'},{tmp_path / 'sft'}"),  # comma-separated
                MergeArguments(output_dir=str(tmp_path / "merged")))
    assert_same_weights(merged_state(out), reference, atol=1e-5)
    merged_model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    for got, want in zip(logits(merged_model, tok, lines), expected):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    del base


def meta_to_hf(folder: Path) -> dict[str, torch.Tensor]:
    """Convert Meta's layout back the way transformers' convert_llama_weights_to_hf.py did (written here
    independently of yak.merge): concatenate the model-parallel parts, re-apply the rotary permutation."""
    params = json.loads((folder / "params.json").read_text())
    parts = [torch.load(p, weights_only=True, mmap=True) for p in sorted(folder.glob("consolidated.*.pth"))]
    dim, n_heads, n_kv = params["dim"], params["n_heads"], params["n_kv_heads"]

    def cat(name):
        if parts[0][name].dim() == 1:
            return parts[0][name]
        axis = 1 if name.startswith("tok_embeddings") or name.endswith(("wo.weight", "w2.weight")) else 0
        return torch.cat([p[name] for p in parts], dim=axis)

    def permute(w, heads):  # transformers' permute(): interleaved pairs -> halves
        return w.view(heads, w.shape[0] // heads // 2, 2, dim).transpose(1, 2).reshape(w.shape[0], dim)

    hf = {"model.embed_tokens.weight": cat("tok_embeddings.weight"), "model.norm.weight": cat("norm.weight"),
          "lm_head.weight": cat("output.weight")}
    for i in range(params["n_layers"]):
        pre, m = f"model.layers.{i}.", f"layers.{i}."
        hf.update({
            pre + "self_attn.q_proj.weight": permute(cat(m + "attention.wq.weight"), n_heads),
            pre + "self_attn.k_proj.weight": permute(cat(m + "attention.wk.weight"), n_kv),
            pre + "self_attn.v_proj.weight": cat(m + "attention.wv.weight"),
            pre + "self_attn.o_proj.weight": cat(m + "attention.wo.weight"),
            pre + "mlp.gate_proj.weight": cat(m + "feed_forward.w1.weight"),
            pre + "mlp.down_proj.weight": cat(m + "feed_forward.w2.weight"),
            pre + "mlp.up_proj.weight": cat(m + "feed_forward.w3.weight"),
            pre + "input_layernorm.weight": cat(m + "attention_norm.weight"),
            pre + "post_attention_layernorm.weight": cat(m + "ffn_norm.weight"),
        })
    return hf


@pytest.mark.parametrize("num_shards", [None, 2])
def test_pth_output_converts_back_to_the_huggingface_output(tiny_model_dir, resized_adapter, tmp_path,
                                                            num_shards):
    adapter, _, tok = resized_adapter
    source = ModelSource(base_model=str(tiny_model_dir), adapters=[str(adapter)], dtype="bfloat16")
    hf = merged_state(merge(source, MergeArguments(output_dir=str(tmp_path / "hf"))))
    out = merge(source, MergeArguments(output_dir=str(tmp_path / "pth"), output_type="pth", num_shards=num_shards))
    assert sorted(p.name for p in out.glob("*.pth")) == [f"consolidated.{i:02d}.pth"
                                                         for i in range(num_shards or 1)]
    assert [p.name for p in out.glob(".*")] == [".yak_manifest.json"]  # the streamed intermediates are gone
    params = json.loads((out / "params.json").read_text())
    assert (params["vocab_size"], params["n_heads"], params["n_kv_heads"]) == (3520, 8, 4)
    assert len(AutoTokenizer.from_pretrained(out)) == len(tok)
    back = meta_to_hf(out)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["tie_word_embeddings"]
    hf["lm_head.weight"] = hf["model.embed_tokens.weight"]  # Meta's layout has no tying
    assert sorted(back) == sorted(hf)
    for k in hf:
        assert torch.equal(back[k], hf[k]), k


@pytest.mark.parametrize("dim,ffn", [(4096, 11008), (5120, 13824), (8192, 28672), (64, 172), (32, 88)])
def test_meta_params_reproduce_the_feed_forward_size(dim, ffn):
    p = meta_params({"hidden_size": dim, "intermediate_size": ffn, "num_hidden_layers": 2,
                     "num_attention_heads": 8, "rms_norm_eps": 1e-5}, 32000)
    h = int(2 * 4 * dim / 3)  # Meta's FeedForward sizing (llama/model.py)
    if "ffn_dim_multiplier" in p:
        h = int(p["ffn_dim_multiplier"] * h)
    assert p["multiple_of"] * ((h + p["multiple_of"] - 1) // p["multiple_of"]) == ffn


def test_bad_inputs_are_all_reported_before_writing(tiny_model_dir, resized_adapter, tmp_path, monkeypatch):
    adapter, _, _ = resized_adapter
    other = tmp_path / "other_base"
    untied_base(other)
    no_config = tmp_path / "no_config"
    shutil.copytree(adapter, no_config)
    (no_config / "adapter_config.json").unlink()
    out = tmp_path / "out"
    # an adapter made for another base model (names and shapes differ) and a missing adapter_config.json
    with pytest.raises(YakError) as e:
        merge(ModelSource(base_model=str(other), adapters=f"{adapter},{no_config}"),
              MergeArguments(output_dir=str(out)))
    msg = str(e.value)
    assert "does not exist in the base model" in msg and "made for another base" in msg
    assert "neither adapter_config.json" in msg
    # the tokenizer does not match the adapter's embeddings; the output is the input folder
    with pytest.raises(YakError) as e:
        merge(ModelSource(base_model=str(tiny_model_dir), adapters=str(adapter), tokenizer_path=str(other)),
              MergeArguments(output_dir=str(adapter), overwrite=True))
    msg = str(e.value)
    assert "no tokenizer.json or tokenizer.model" in msg and "is (or contains) the input" in msg
    with pytest.raises(YakError, match=r"512 tokens .* 3520 rows"):
        merge(ModelSource(base_model=str(tiny_model_dir), adapters=str(adapter), tokenizer_path=str(tiny_model_dir)),
              MergeArguments(output_dir=str(out)))
    with pytest.raises(YakError, match="--num_shards must be at least 1, got -1"):  # was a RuntimeError from chunk
        merge(ModelSource(base_model=str(tiny_model_dir), adapters=str(adapter)),
              MergeArguments(output_dir=str(out), output_type="pth", num_shards=-1))
    # a truncated adapter file (e.g. an interrupted copy)
    truncated = tmp_path / "truncated"
    shutil.copytree(adapter, truncated)
    (truncated / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes()[:100])
    with pytest.raises(YakError, match="truncated.adapter_model.safetensors cannot be read"):
        merge(ModelSource(base_model=str(tiny_model_dir), adapters=str(truncated)),
              MergeArguments(output_dir=str(out)))
    # too little disk space (the file system's free space, as the OS reports it, made small)
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    with pytest.raises(YakError, match="GiB free"):
        merge(ModelSource(base_model=str(tiny_model_dir), adapters=str(adapter)),
              MergeArguments(output_dir=str(out)))
    monkeypatch.undo()
    assert not out.exists() and list(tmp_path.glob(".out*")) == []


def test_adapters_in_the_wrong_order_or_already_merged_are_refused(tiny_model_dir, resized_adapter, tmp_path):
    """SFT trained on top of CPT, given before it: the merge ran and kept CPT's embeddings, silently."""
    from yak.evaluation.runner import EvalArguments, prepare
    from yak.modeling import load_model_and_tokenizer

    adapter, _, _ = resized_adapter
    cpt, sft = tmp_path / "cpt", tmp_path / "sft"
    shutil.copytree(adapter, cpt)
    shutil.copytree(adapter, sft)
    # what training writes (yak_run.json): the --adapters it was trained on top of
    (sft / "yak_run.json").write_text(json.dumps({"identity": {"task": "sft", "adapters": [str(cpt)]}}))
    out = tmp_path / "out"
    with pytest.raises(YakError, match=r"sft was trained on top of .*cpt, so it must come after it"):
        merge(ModelSource(base_model=str(tiny_model_dir), adapters=f"{sft},{cpt}"),
              MergeArguments(output_dir=str(out)))
    assert not out.exists()
    with pytest.raises(YakError, match="--adapters: .*sft was trained on top of"):  # inference, serving
        load_model_and_tokenizer(ModelSource(tiny_model_dir, [sft, cpt]))
    with pytest.raises(YakError, match="model yak: .*sft was trained on top of"):  # before any model loads
        prepare(EvalArguments(models=[f"yak={tiny_model_dir},{sft},{cpt}"], tasks=["heldout"],
                              output_dir=str(out)))
    merge(ModelSource(base_model=str(tiny_model_dir), adapters=f"{cpt}, {sft}"),
          MergeArguments(output_dir=str(out)))
    assert (out / "model.safetensors").is_file()
    # the merged model records what it holds: applying SFT again on top would add its LoRA update twice
    with pytest.raises(YakError, match=r"sft is merged into .*out already"):
        load_model_and_tokenizer(ModelSource(out, [sft]))
    with pytest.raises(YakError, match=r"sft is merged into .*out already"):
        merge(ModelSource(base_model=str(out), adapters=str(sft)),
              MergeArguments(output_dir=str(tmp_path / "twice")))


def test_adapter_of_another_base_is_one_clear_error_when_loading(tiny_model_dir, resized_adapter, tmp_path):
    """inference_hf.py and serve_demo.py printed peft's traceback with a size mismatch line per tensor."""
    from yak.modeling import load_model_and_tokenizer

    adapter, _, _ = resized_adapter
    untied_base(tmp_path / "other")
    LlamaForCausalLM.from_pretrained(tmp_path / "other").save_pretrained(tmp_path / "other")  # safetensors only
    with pytest.raises(YakError, match=r"--adapters: .*adapter0 has weights for 42 modules that the base .*other "
                                       r"\(2 layers\) lacks.*made for another base"):
        load_model_and_tokenizer(ModelSource(tmp_path / "other", [adapter]))


def test_nan_result_is_refused_and_nothing_is_written(tiny_model_dir, resized_adapter, tmp_path):
    adapter, _, _ = resized_adapter
    bad = tmp_path / "bad"
    shutil.copytree(adapter, bad)
    with safe_open(str(bad / "adapter_model.safetensors"), "pt") as st:
        weights = {k: st.get_tensor(k) for k in st.keys()}
    key = next(k for k in weights if k.endswith("layers.3.mlp.up_proj.lora_B.weight"))
    weights[key][0, 0] = math.inf
    save_file(weights, bad / "adapter_model.safetensors")
    out = tmp_path / "out"
    with pytest.raises(YakError, match="layers.3.mlp.up_proj.weight has NaN or inf"):
        merge(ModelSource(base_model=str(tiny_model_dir), adapters=str(bad)),
              MergeArguments(output_dir=str(out)))
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["bad"]


def test_script_help_and_clean_error_exit(tmp_path):
    script = str(ROOT / "merge_lora_low_mem.py")
    done = subprocess.run([sys.executable, script, "--help"], capture_output=True, check=False, text=True, cwd=ROOT)
    assert done.returncode == 0 and "--lora_model" in done.stdout and "one tensor" in done.stdout
    done = subprocess.run([sys.executable, script, "--base_model", str(tmp_path), "--lora_model",
                           str(tmp_path), "--output_dir", str(tmp_path / "o")], capture_output=True, check=False,
                          text=True, cwd=ROOT)
    assert done.returncode == 2 and "has no config.json" in done.stderr
