"""Model loading, vocabulary resize with mean initialisation, stage-1 / LoRA output formats, on the real tiny model."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import PT_DATA, ROOT
from yak import YakError
from yak.formats import EMBED_KEY, PEFT_EMBED_KEY, PEFT_LM_HEAD_KEY, padded_vocab_size
from yak.modeling import (
    load_base_model,
    load_model_and_tokenizer,
    load_tokenizer,
    prepare_lora,
    prepare_stage1,
    resize_and_init_embeddings,
    resize_for_adapters,
    save_embeddings,
)
from yak.source import ModelSource

MERGED_TOKENIZER = ROOT / "tokenizer" / "stories260K_bo" / "merged_tokenizer_hf"  # 512 + 3000 Tibetan pieces
ENGLISH = "Once upon a time, there was a little girl named Lily. She loved to play outside."


def tibetan_lines(n: int = 40) -> list[str]:
    lines = (PT_DATA / "bo" / "nanhai_modern_deseg.txt").read_text(encoding="utf-8").splitlines()
    return [line[:400] for line in lines[:n] if line.strip()]


@pytest.fixture(scope="module")
def merged_tok_dir():
    return MERGED_TOKENIZER


def _logits(model, tokenizer, text):
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits  # (1, T, V)


@pytest.mark.parametrize("which", ["tied", "untied"])
def test_resize_initialises_new_rows_as_mean_of_base_pieces(
    which, tiny_model_dir, untied_model_dir, merged_tok_dir
):
    model_dir = tiny_model_dir if which == "tied" else untied_model_dir
    model = load_base_model(model_dir, dtype="float32")
    base_tok, tok = load_tokenizer(model_dir), load_tokenizer(merged_tok_dir)
    before = _logits(model, base_tok, ENGLISH)
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()

    rows = resize_and_init_embeddings(model, tok, base_tok)

    assert rows == padded_vocab_size(len(tok)) and rows % 64 == 0 and rows > len(tok)
    assert model.get_input_embeddings().weight.shape[0] == rows
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == (which == "tied")
    # output on text without new tokens: identical logits over the old vocabulary
    after = _logits(model, tok, ENGLISH)
    assert torch.equal(after[..., :512], before)
    # oracle independent of the code: the base tokenizer has no Tibetan pieces, so a new Tibetan piece falls
    # back to its UTF-8 bytes (after the word-start piece "▁" if it starts a word): its row is their mean
    pieces = tok.convert_ids_to_tokens(list(range(512, len(tok))))
    starts = [i for i, p in enumerate(pieces, 512) if p.startswith("▁") and len(p) > 1]
    inner = [i for i, p in enumerate(pieces, 512) if "▁" not in p]
    assert starts and inner
    for weight, old in (
        (model.get_input_embeddings().weight, old_in),
        (model.get_output_embeddings().weight, old_out),
    ):
        for new_id in (inner[0], inner[-1], starts[0], starts[-1]):
            piece = pieces[new_id - 512]
            text = piece.removeprefix("▁")
            expected = (
                [base_tok.convert_tokens_to_ids("▁")] if piece != text else []
            ) + base_tok.convert_tokens_to_ids([f"<0x{b:02X}>" for b in text.encode("utf-8")])
            torch.testing.assert_close(weight[new_id], old[expected].mean(0))
        torch.testing.assert_close(weight[len(tok)], old.mean(0))  # padding rows
        assert torch.equal(weight[:512], old)


def test_resize_random_init_draws_new_rows_and_keeps_the_rest(tiny_model_dir, merged_tok_dir):
    base_tok, tok = load_tokenizer(tiny_model_dir), load_tokenizer(merged_tok_dir)
    mean_model = load_base_model(tiny_model_dir, dtype="float32")
    resize_and_init_embeddings(mean_model, tok, base_tok)
    drawn = []
    for _ in range(2):
        model = load_base_model(tiny_model_dir, dtype="float32")
        old = model.get_input_embeddings().weight.detach().clone()
        torch.manual_seed(7)
        resize_and_init_embeddings(model, tok, base_tok, init="random")
        w = model.get_input_embeddings().weight.detach()
        assert torch.equal(w[:512], old)  # the base rows are untouched
        assert torch.equal(w[len(tok) :], mean_model.get_input_embeddings().weight[len(tok) :])  # padding: mean
        drawn.append(w[512 : len(tok)].clone())
    assert torch.equal(drawn[0], drawn[1])  # the global seed makes it repeatable
    new = drawn[0]  # (3000, 64): N(0, initializer_range), unlike the mean rows
    std = load_base_model(tiny_model_dir).config.initializer_range
    assert abs(new.std().item() - std) < 0.05 * std and abs(new.mean().item()) < 0.05 * std
    assert not torch.allclose(new, mean_model.get_input_embeddings().weight[512 : len(tok)])
    with pytest.raises(YakError, match="must be one of mean, random"):
        resize_and_init_embeddings(model, tok, base_tok, init="zeros")


def test_resize_refuses_a_tokenizer_that_is_not_an_extension(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    model = load_base_model(tiny_model_dir)
    base = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    base.add_tokens(["ཀཀཀ"])
    with pytest.raises(YakError, match="has 512 tokens, fewer than the 513"):
        resize_and_init_embeddings(model, tok, base)


def test_load_model_and_tokenizer_applies_stage1_then_lora(tiny_model_dir, merged_tok_dir, tmp_path):
    base_tok, tok = load_tokenizer(tiny_model_dir), load_tokenizer(merged_tok_dir)
    model = load_base_model(tiny_model_dir, dtype="float32")
    resize_and_init_embeddings(model, tok, base_tok)
    prepare_stage1(model)
    with torch.no_grad():
        model.get_input_embeddings().weight[512:].mul_(2.0)  # "training"
    stage1 = tmp_path / "stage1"
    save_embeddings(model, stage1, str(tiny_model_dir))
    tok.save_pretrained(str(stage1))
    info = json.loads((stage1 / "yak_adapter.json").read_text())
    assert info == {
        "format": "yak-embeddings",
        "version": 1,
        "base_model_name_or_path": str(tiny_model_dir),
        "vocab_size": padded_vocab_size(len(tok)),
        "tie_word_embeddings": True,
    }
    assert set(load_file(str(stage1 / "embeddings.safetensors"))) == {EMBED_KEY}

    m1, t1 = load_model_and_tokenizer(ModelSource(tiny_model_dir, [stage1], dtype="float32"), device="cpu")
    assert len(t1) == len(tok)
    assert torch.equal(m1.get_input_embeddings().weight, model.get_input_embeddings().weight)

    peft_model = prepare_lora(
        model,
        rank=4,
        alpha=8,
        dropout=0.0,
        target_modules=["q_proj", "v_proj"],
        modules_to_save=["embed_tokens", "lm_head"],
    )
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(0.01 * torch.randn_like(p))
    stage2 = tmp_path / "stage2"
    peft_model.save_pretrained(str(stage2), save_embedding_layers=False)
    saved = load_file(str(stage2 / "adapter_model.safetensors"))
    # tied model: one trained matrix, saved under both keys (docs/formats.md)
    assert torch.equal(saved[PEFT_EMBED_KEY], saved[PEFT_LM_HEAD_KEY])
    assert {k for k in saved if "lora_" not in k} == {PEFT_EMBED_KEY, PEFT_LM_HEAD_KEY}
    reference = peft_model.merge_and_unload()
    ids = tok(tibetan_lines(1)[0][:100], return_tensors="pt").input_ids
    assert (ids >= 512).any()

    m2, t2 = load_model_and_tokenizer(ModelSource(tiny_model_dir, [stage1, stage2], dtype="float32"), device="cpu")
    assert t2.name_or_path == str(stage1)  # stage2 has no tokenizer files here: the last folder that has one
    with torch.no_grad():
        torch.testing.assert_close(m2(ids).logits, reference(ids).logits)
    assert m2.lm_head.weight is m2.model.embed_tokens.weight


def test_untied_lora_adapter_carries_both_matrices(untied_model_dir, merged_tok_dir, tmp_path):
    base_tok, tok = load_tokenizer(untied_model_dir), load_tokenizer(merged_tok_dir)
    model = load_base_model(untied_model_dir, dtype="float32")
    resize_and_init_embeddings(model, tok, base_tok)
    peft_model = prepare_lora(
        model,
        rank=4,
        alpha=8,
        dropout=0.0,
        target_modules=["q_proj"],
        modules_to_save=["embed_tokens", "lm_head"],
    )
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "modules_to_save" in name:
                p.add_(torch.randn_like(p))
    out = tmp_path / "adapter"
    peft_model.save_pretrained(str(out), save_embedding_layers=False)
    tok.save_pretrained(str(out))
    saved = load_file(str(out / "adapter_model.safetensors"))
    assert not torch.equal(saved[PEFT_EMBED_KEY], saved[PEFT_LM_HEAD_KEY])
    reference = peft_model.merge_and_unload()
    m, t = load_model_and_tokenizer(ModelSource(untied_model_dir, [out], dtype="float32"), device="cpu")
    assert t.name_or_path == str(out)
    assert torch.equal(m.lm_head.weight, reference.lm_head.weight)
    assert torch.equal(m.model.embed_tokens.weight, reference.model.embed_tokens.weight)


def test_untied_adapter_without_lm_head_is_refused_not_loaded_with_random_rows(
    untied_model_dir, merged_tok_dir, tmp_path
):
    """Training mean-initialised the new lm_head rows; an adapter that does not carry lm_head cannot bring them
    back, so loading it would give the new tokens random output rows (the merge refuses it too)."""
    model = load_base_model(untied_model_dir, dtype="float32")
    resize_and_init_embeddings(model, load_tokenizer(merged_tok_dir), load_tokenizer(untied_model_dir))
    peft_model = prepare_lora(
        model, rank=4, alpha=8, dropout=0.0, target_modules=["q_proj"], modules_to_save=["embed_tokens"]
    )
    out = tmp_path / "adapter"
    peft_model.save_pretrained(str(out), save_embedding_layers=False)
    load_tokenizer(merged_tok_dir).save_pretrained(str(out))
    with pytest.raises(YakError, match="lm_head"):
        load_model_and_tokenizer(ModelSource(untied_model_dir, [out], dtype="float32"), device="cpu")


def test_dtype_option(tiny_model_dir):
    assert next(load_base_model(tiny_model_dir, dtype="bfloat16").parameters()).dtype == torch.bfloat16
    assert next(load_base_model(tiny_model_dir, dtype="auto").parameters()).dtype == torch.float32
    m, _ = load_model_and_tokenizer(ModelSource(tiny_model_dir, dtype="bfloat16"), device="cpu")
    assert m.dtype == torch.bfloat16 and not m.training


def test_bad_inputs_are_explained(tiny_model_dir, merged_tok_dir, tmp_path):
    # a tokenizer bigger than the model, with nothing that brings the new rows
    with pytest.raises(YakError, match=r"has 3512 tokens but the model has only 512 embedding rows"):
        load_model_and_tokenizer(ModelSource(tiny_model_dir, tokenizer_path=merged_tok_dir), device="cpu")
    # an adapter trained for another vocabulary size
    model = load_base_model(tiny_model_dir)
    stage1 = tmp_path / "stage1"
    save_embeddings(model, stage1, str(tiny_model_dir))  # 512 rows
    with pytest.raises(YakError, match=r"resized to 3520 rows .* carries embeddings of 512 rows"):
        load_model_and_tokenizer(ModelSource(tiny_model_dir, [stage1], tokenizer_path=merged_tok_dir), device="cpu")
    # .bin weights that are not a tensor file
    bin_only = tmp_path / "bin_only"
    bin_only.mkdir()
    shutil.copy(tiny_model_dir / "config.json", bin_only)
    (bin_only / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(YakError, match="pytorch_model.bin cannot be read .* cut short or corrupt"):
        load_base_model(bin_only)
    # a misspelt attention implementation (was transformers' ValueError traceback)
    with pytest.raises(YakError, match="--attn_implementation spda: .*not supported"):
        load_base_model(tiny_model_dir, attn_implementation="spda")
    with pytest.raises(YakError, match="neither a stage-1 output"):
        load_model_and_tokenizer(ModelSource(tiny_model_dir, [tmp_path]))
    # a peft adapter without safetensors
    (tmp_path / "ad").mkdir()
    (tmp_path / "ad" / "adapter_config.json").write_text("{}")
    with pytest.raises(YakError, match="no adapter_model.safetensors"):
        load_model_and_tokenizer(ModelSource(tiny_model_dir, [tmp_path / "ad"]))


def test_adapter_trained_with_another_tokenizer_of_the_same_size_is_refused(
    tiny_model_dir, merged_tok_dir, tmp_path
):
    """Same number of pieces, other ids (a tokenizer rebuilt from other text): the adapter's rows would mean
    other tokens. The size check alone let it through, in training (--adapters) and in loading."""
    model = load_base_model(tiny_model_dir)
    resize_and_init_embeddings(model, load_tokenizer(merged_tok_dir), load_tokenizer(tiny_model_dir))
    stage1 = tmp_path / "stage1"
    save_embeddings(model, stage1, str(tiny_model_dir))
    shutil.copytree(merged_tok_dir, stage1, dirs_exist_ok=True)
    other = tmp_path / "other_tokenizer"
    shutil.copytree(merged_tok_dir, other)
    (other / "tokenizer.model").unlink()
    spec = json.loads((other / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = spec["model"]["vocab"]
    a, b = (next(p for p, i in vocab.items() if i == n) for n in (600, 601))
    vocab[a], vocab[b] = 601, 600  # two Tibetan pieces swap ids
    (other / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    # what train.py --adapters stage1 --tokenizer_name_or_path other does before training
    with pytest.raises(YakError, match="stage1 was trained with another tokenizer of that size"):
        resize_for_adapters(load_base_model(tiny_model_dir), load_tokenizer(other), [stage1], str(other))
    resize_for_adapters(fresh := load_base_model(tiny_model_dir), load_tokenizer(merged_tok_dir), [stage1], "same")
    assert fresh.get_input_embeddings().weight.shape[0] == 3520


def test_load_in_kbits_without_bitsandbytes_is_a_clear_error(tiny_model_dir):
    try:
        import bitsandbytes  # noqa: F401

        pytest.skip("bitsandbytes is installed")
    except ImportError:
        pass
    with pytest.raises(YakError, match="needs the bitsandbytes package"):
        load_base_model(tiny_model_dir, load_in_kbits=4)


def test_stage1_freezes_all_but_embeddings(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    prepare_stage1(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["model.embed_tokens.weight"]  # lm_head is the same tensor (tied)


def test_compile_decoder_layers_keeps_names_and_outputs(tiny_model_dir):
    """--compile_layers compiles in place: same parameter names (saving, peft), same logits."""
    from yak.modeling import compile_decoder_layers

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 403, 407, 410, 261, 428]])
    with torch.no_grad():
        ref = model(ids).logits
    names = [n for n, _ in model.named_parameters()]
    assert compile_decoder_layers(model) == model.config.num_hidden_layers
    assert [n for n, _ in model.named_parameters()] == names
    with torch.no_grad():
        out = model(ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
