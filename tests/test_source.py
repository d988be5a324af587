"""ModelSource: one spelling of the model options in every script, the original flag names as aliases, one
tokenizer rule, one validation."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.conftest import ROOT, TINY_MODEL
from yak import YakError
from yak.cli import parse_args
from yak.evaluation.scoring import ModelSpec
from yak.generation import GenerationArguments, InferenceArguments
from yak.merge import MergeArguments
from yak.modeling import save_embeddings
from yak.server import ServerArguments
from yak.source import ModelSource
from yak.training import parse_train_args

MERGED_TOKENIZER = ROOT / "tokenizer" / "stories260K_bo" / "merged_tokenizer_hf"


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """Two real stage-1 outputs of the tiny model; the second carries the merged tokenizer, as training saves it."""
    from yak.modeling import load_base_model

    root = tmp_path_factory.mktemp("stages")
    model = load_base_model(TINY_MODEL, device="cpu")
    for name in ("s1", "s2"):
        save_embeddings(model, root / name, str(TINY_MODEL))
    for f in MERGED_TOKENIZER.iterdir():
        shutil.copy(f, root / "s2")
    return root / "s1", root / "s2"


@pytest.mark.parametrize("classes", [
    [ModelSource, GenerationArguments, InferenceArguments],  # inference_hf.py
    [ModelSource, GenerationArguments, ServerArguments],  # serve_demo.py
    [ModelSource, MergeArguments],  # merge_lora_low_mem.py
])
def test_original_flags_mean_what_they_meant(classes, stages):
    s1, s2 = stages
    extra = ["--output_dir", "o"] if MergeArguments in classes else []
    original = parse_args(classes, ["--base_model", str(TINY_MODEL), "--lora_model", f"{s1}, {s2}",
                                    "--tokenizer_path", str(MERGED_TOKENIZER), "--output_dtype", "bfloat16", *extra])
    ours = parse_args(classes, ["--base_model", str(TINY_MODEL), "--adapters", str(s1), str(s2),
                                "--tokenizer_path", str(MERGED_TOKENIZER), "--dtype", "bfloat16", *extra])
    assert original[0] == ours[0] == ModelSource(str(TINY_MODEL), [str(s1), str(s2)], str(MERGED_TOKENIZER),
                                                 "bfloat16")


def test_training_flags_of_the_original_and_config_keys(stages, tmp_path):
    s1, _ = stages
    common = ["--dataset_dir", str(ROOT / "data" / "pt"), "--output_dir", str(tmp_path / "o")]
    source = parse_train_args(["--model_name_or_path", str(TINY_MODEL), "--tokenizer_name_or_path",
                               str(MERGED_TOKENIZER), "--torch_dtype", "float32", "--adapters", str(s1), *common])[0]
    assert source == ModelSource(str(TINY_MODEL), [str(s1)], str(MERGED_TOKENIZER), "float32")
    config = {"model_name_or_path": str(TINY_MODEL), "lora_model": f"{s1}", "torch_dtype": "float32",
              "tokenizer_path": str(MERGED_TOKENIZER), "dataset_dir": common[1], "output_dir": common[3]}
    (tmp_path / "c.yaml").write_text(json.dumps(config))  # JSON is YAML
    assert parse_train_args([str(tmp_path / "c.yaml")])[0] == source
    (tmp_path / "twice.json").write_text(json.dumps({**config, "base_model": str(TINY_MODEL)}))
    with pytest.raises(YakError, match="'model_name_or_path' and 'base_model' are one option; give it once"):
        parse_train_args([str(tmp_path / "twice.json")])


def test_one_tokenizer_rule(stages):
    s1, s2 = stages
    assert ModelSource(TINY_MODEL).tokenizer_dir() == str(TINY_MODEL)
    assert ModelSource(TINY_MODEL, [s1]).tokenizer_dir() == str(TINY_MODEL)  # no tokenizer in stage 1's output
    assert ModelSource(TINY_MODEL, [s2, s1]).tokenizer_dir() == str(s2)  # the last adapter that has one
    assert ModelSource(TINY_MODEL, [s2], tokenizer_path=TINY_MODEL).tokenizer_dir() == str(TINY_MODEL)  # given


def test_problems_are_listed_with_the_option_or_the_model_name(stages, tmp_path):
    s1, _ = stages
    assert ModelSource(TINY_MODEL, [s1]).problems() == []
    found = ModelSource(None, [s1, tmp_path / "nowhere"], tmp_path / "no_tok", "float8").problems()
    assert found == [
        "--base_model: required: a Hugging Face model folder",
        f"--adapters: adapter folder {tmp_path / 'nowhere'} does not exist",
        f"--tokenizer_path: {tmp_path / 'no_tok'} is not a folder",
        "--dtype: 'float8' is not one of auto, float32, bfloat16, float16",
    ]
    spec = ModelSpec.parse(f"yak={tmp_path},{s1}")
    assert spec.source == ModelSource(str(tmp_path), [str(s1)])
    assert spec.problems() == [f"model yak: model folder {tmp_path} has no config.json; pass a Hugging Face model folder"]
    with pytest.raises(YakError, match="expected BASE"):
        ModelSpec.parse("yak=")
