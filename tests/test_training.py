"""Training on the real tiny model with the shipped merged tokenizer and real lines of data/pt."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback, TrainingArguments

from tests.conftest import HELDOUT, PT_DATA, ROOT
from yak import YakError
from yak.modeling import (
    load_base_model,
    load_model_and_tokenizer,
    load_tokenizer,
    prepare_lora,
    resize_and_init_embeddings,
    save_embeddings,
)
from yak.outdir import Claim
from yak.source import ModelSource
from yak.training import parse_train_args, run_training
from yak.training.arguments import StageArguments
from yak.training.model import build_model
from yak.training.run_folder import COMPLETE_MARKER
from yak.training.schedule import resolve_schedule
from yak.training.trainer import optimizer_groups

MERGED_TOKENIZER = ROOT / "tokenizer" / "stories260K_bo" / "merged_tokenizer_hf"
STORY = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
    "One day, she saw a big dog. The dog was very friendly and they played together all day."
)


@pytest.fixture(scope="module")
def pt_dir(tmp_path_factory):
    """A small dataset_dir of real lines: bo (Milarepa), en (Austen), zh (Honglou meng)."""
    root = tmp_path_factory.mktemp("pt")
    for src, n in (
        ("bo/mila.txt", 10),
        ("en/austen_pride_and_prejudice.txt", 300),
        ("zh/hongloumeng_ch001-080.txt", 10),
    ):
        (root / src).parent.mkdir(parents=True, exist_ok=True)
        lines = (PT_DATA / src).read_text(encoding="utf-8").splitlines(keepends=True)[:n]
        (root / src).write_text("".join(lines), encoding="utf-8")
    return root


def argv(pt_dir, output_dir, *extra) -> list[str]:
    return [
        "--model_name_or_path",
        str(ROOT / "models" / "stories260K"),
        "--tokenizer_name_or_path",
        str(MERGED_TOKENIZER),
        "--dataset_dir",
        str(pt_dir),
        "--data_cache_dir",
        str(pt_dir.parent / "cache"),
        "--block_size",
        "64",
        "--per_device_train_batch_size",
        "4",
        "--output_dir",
        str(output_dir),
        "--use_cpu",
        "--report_to",
        "none",
        "--logging_steps",
        "1",
        "--seed",
        "7",
        "--dataloader_num_workers",
        "0",
        "--plot_loss",
        "false",
        *extra,
    ]


def cpu_args(output_dir, **kwargs) -> TrainingArguments:
    return TrainingArguments(output_dir=str(output_dir), use_cpu=True, report_to="none", **kwargs)


class Capture(TrainerCallback):
    """Keeps a copy of the model's weights at the end of training."""

    state_dict: dict | None = None

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.state_dict = {k: v.detach().clone() for k, v in model.state_dict().items()}


class StopAt(TrainerCallback):
    """Simulates a crash: raises at the end of step ``step`` (after the previous checkpoint was saved)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt("simulated kill")


def _loss(model, tokenizer, text: str, max_tokens: int = 256) -> float:
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :max_tokens]
    with torch.no_grad():
        return model(ids, labels=ids).loss.item()


def test_stage1_then_stage2_change_only_what_they_train(pt_dir, tmp_path, tiny_model_dir):
    base = load_base_model(tiny_model_dir, dtype="float32")
    base_tok, tok = load_tokenizer(tiny_model_dir), load_tokenizer(MERGED_TOKENIZER)
    resize_and_init_embeddings(base, tok, base_tok)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    heldout_bo = (HELDOUT / "bo_modern_nanhai_deseg_heldout.txt").read_text(encoding="utf-8")[:3000]

    # stage 1: only the (tied) embedding matrix changes; every other weight stays bit-identical
    cap1 = Capture()
    s1 = tmp_path / "stage1"
    summary = run_training(
        *parse_train_args(
            argv(
                pt_dir,
                s1,
                "--stage",
                "1",
                "--max_steps",
                "30",
                "--learning_rate",
                "5e-3",
                "--warmup_steps",
                "3",
            )
        ),
        callbacks=[cap1],
    )
    assert summary["global_step"] == 30 and (s1 / "embeddings.safetensors").is_file()
    for key, value in base_state.items():
        changed = not torch.equal(cap1.state_dict[key], value)
        assert changed == (key in ("model.embed_tokens.weight", "lm_head.weight")), key
    m1, t1 = load_model_and_tokenizer(ModelSource(tiny_model_dir, [s1], dtype="float32"), device="cpu")
    assert len(t1) == len(tok)
    assert torch.equal(m1.model.embed_tokens.weight, cap1.state_dict["model.embed_tokens.weight"])
    # Tibetan held-out loss falls; English story loss stays close to the base model's
    assert _loss(m1, t1, heldout_bo) < _loss(base, tok, heldout_bo) - 0.5
    assert abs(_loss(m1, t1, STORY) - _loss(base, tok, STORY)) < 0.25

    # stage 2 from stage 1: only LoRA weights and the embeddings (modules_to_save) change
    cap2 = Capture()
    s2 = tmp_path / "stage2"
    run_training(
        *parse_train_args(
            argv(
                pt_dir,
                s2,
                "--stage",
                "2",
                "--adapters",
                str(s1),
                "--max_steps",
                "4",
                "--lora_rank",
                "4",
                "--lora_alpha",
                "8",
                "--learning_rate",
                "1e-3",
            )
        ),
        callbacks=[cap2],
    )
    stage1_state = m1.state_dict()
    for key, value in cap2.state_dict.items():
        if "lora_" in key or "modules_to_save" in key:
            if "lora_A" in key or "modules_to_save" in key:  # B starts at zero and moves too; A moves
                assert not torch.equal(
                    value,
                    stage1_state.get(
                        key.replace(".modules_to_save.default", "").replace("base_model.model.", ""),
                        value * 0,
                    ),
                ), key
            continue
        plain = (
            key.replace("base_model.model.", "").replace(".base_layer", "").replace(".original_module", "")
        )
        assert torch.equal(value, stage1_state[plain]), key
    config = json.loads((s2 / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["ensure_weight_tying"] is True
    assert len(load_model_and_tokenizer(ModelSource(tiny_model_dir, [s1, s2]), device="cpu")[1]) == len(tok)


def test_killed_and_resumed_run_follows_the_uninterrupted_losses(pt_dir, tmp_path):
    extra = (
        "--stage",
        "2",
        "--max_steps",
        "6",
        "--save_steps",
        "2",
        "--save_total_limit",
        "2",
        "--lora_rank",
        "4",
        "--lora_alpha",
        "8",
        "--learning_rate",
        "2e-3",
        "--warmup_steps",
        "2",
        "--lr_scheduler_type",
        "cosine",
        "--modules_to_save",
        "embed_tokens",
    )
    full = run_training(*parse_train_args(argv(pt_dir, tmp_path / "full", *extra)))

    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        run_training(*parse_train_args(argv(pt_dir, out, *extra)), callbacks=[StopAt(5)])
    assert (out / "checkpoint-4" / COMPLETE_MARKER).is_file()
    claim = Claim.take(out)  # a save interrupted half-way (recorded, as a save does first): never resumed, removed
    claim.record("checkpoint-5/")
    claim.release()
    (out / "checkpoint-5").mkdir()
    (out / "checkpoint-5" / "adapter_model.safetensors").write_bytes(b"half")
    resumed = run_training(*parse_train_args(argv(pt_dir, out, *extra)))

    assert len(full["losses"]) == 6
    assert resumed["losses"] == pytest.approx(full["losses"], rel=1e-5)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    # the finished run is not silently trained again or overwritten
    with pytest.raises(YakError, match="holds a finished run"):
        run_training(*parse_train_args(argv(pt_dir, out, *extra)))


def test_resume_refuses_changed_settings_and_lists_each_difference(pt_dir, tmp_path):
    """Resuming promises the run it continues (data order, schedule, optimizer state): changed learning rates,
    schedule, data or batch are refused up front, each listed; logging, saving and evaluation may change, and
    so may the split of the same samples per step; a key missing in an older run file is no difference."""
    out = tmp_path / "run"
    extra = ("--stage", "1", "--max_steps", "3", "--save_steps", "1", "--learning_rate", "1e-3")
    with pytest.raises(KeyboardInterrupt):
        run_training(*parse_train_args(argv(pt_dir, out, *extra)), callbacks=[StopAt(2)])
    assert (out / "checkpoint-1" / COMPLETE_MARKER).is_file()
    changed = (
        "--learning_rate", "2e-3", "--embedding_learning_rate", "1e-2", "--lr_scheduler_type", "cosine",
        "--warmup_steps", "1", "--block_size", "32", "--mix", "none", "--per_device_train_batch_size", "2",
        "--max_steps", "5", "--seed", "8",
    )  # fmt: skip
    with pytest.raises(YakError) as e:  # was: resumed silently with the new settings
        run_training(*parse_train_args(argv(pt_dir, out, *extra, *changed)))
    message = str(e.value)
    for difference in [
        "learning_rate: 0.001 there, 0.002 now", "embedding_learning_rate: None there, 0.01 now",
        "lr_scheduler_type: 'linear' there, 'cosine' now", "warmup_steps: 0 there, 1.0 now",
        "block_size: 64 there, 32 now", "mix: 'bo=3,en+zh=4' there, 'none' now",
        "samples_per_step (batch size x gradient accumulation x processes): 4 there, 2 now",
        "max_steps: 3 there, 5 now", "seed: 7 there, 8 now",
    ]:  # fmt: skip
        assert f"\n  - {difference}" in message
    assert message.count("\n  - ") == 9
    assert "choose another --output_dir, or pass --overwrite_output_dir" in message
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-1"]
    # an older run file (the settings it had then), other logging, saving and evaluation, and the same 4
    # samples per step as 2 x 2 accumulated
    run_file = out / "yak_run.json"
    old = {"task": "task", "stage": "stage", "model_name_or_path": "base_model", "tokenizer_name_or_path":
           "tokenizer_path", "adapters": "adapters", "lora_rank": "lora_rank", "trainable": "trainable",
           "modules_to_save": "modules_to_save"}  # fmt: skip  (the model options under the original flag names)
    record = json.loads(run_file.read_text())
    run_file.write_text(json.dumps({"identity": {k: record["identity"][new] for k, new in old.items()}}))
    same = (
        "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
        "--logging_steps", "2", "--save_steps", "3", "--eval_strategy", "steps", "--eval_steps", "3",
    )  # fmt: skip
    summary = run_training(*parse_train_args(argv(pt_dir, out, *extra, *same)))
    assert summary["global_step"] == 3 and (out / "yak_adapter.json").is_file()
    assert json.loads(run_file.read_text())["identity"]["learning_rate"] == 1e-3  # recorded in full again


def test_resume_from_another_working_directory(tmp_path, monkeypatch):
    """A run started with relative paths resumes from another directory given the same folders absolutely
    (was refused: the run file kept 'data/pt', which names nothing from elsewhere)."""
    from yak.training.run_folder import _identity, _identity_differences

    folders = ("models/stories260K", "tokenizer/stories260K_bo/merged_tokenizer_hf", "data/pt")
    relative = ["--model_name_or_path", folders[0], "--tokenizer_name_or_path", folders[1], "--dataset_dir",
                folders[2], "--stage", "1", "--output_dir", str(tmp_path / "out"), "--max_steps", "3", "--use_cpu"]
    monkeypatch.chdir(ROOT)
    recorded = json.loads(json.dumps(_identity(*parse_train_args(relative))))  # as the run file keeps it
    monkeypatch.chdir(tmp_path)
    absolute = [str(ROOT / a) if a in folders else a for a in relative]
    assert _identity_differences(recorded, _identity(*parse_train_args(absolute))) == []
    assert _identity_differences(recorded, _identity(*parse_train_args(relative))) != []  # names nothing here


def test_resume_compares_folders_not_how_they_are_written(pt_dir):
    from yak.training.run_folder import _identity_differences

    same = str(pt_dir.parent / ".." / pt_dir.parent.name / pt_dir.name)
    assert _identity_differences({"dataset_dir": str(pt_dir), "adapters": [str(pt_dir)]},
                                 {"dataset_dir": same, "adapters": [same]}) == []
    assert _identity_differences({"dataset_dir": str(pt_dir)}, {"dataset_dir": str(pt_dir.parent)}) != []
    hub = {"base_model": "meta-llama/Llama-2-7b-hf"}  # not a local path: compared as written
    assert _identity_differences(hub, {"base_model": "meta-llama/Llama-2-13b-hf"}) != []


def test_save_total_limit_keeps_the_last_complete_checkpoint_until_the_next_is_complete(
    pt_dir, tmp_path, monkeypatch
):
    """Killed after checkpoint-4's files but before its marker (under ZeRO, while other ranks still write their
    shards): with --save_total_limit 1, checkpoint-2 must still be there to resume from."""
    import yak.training.trainer

    write = yak.training.trainer.atomic_write_json

    def killed_at_marker_4(path, obj):
        if path.name == COMPLETE_MARKER and path.parent.name == "checkpoint-4":
            raise KeyboardInterrupt("simulated kill while saving")
        write(path, obj)

    monkeypatch.setattr(yak.training.trainer, "atomic_write_json", killed_at_marker_4)
    out = tmp_path / "run"
    extra = ("--stage", "1", "--max_steps", "6", "--save_steps", "2", "--save_total_limit", "1")
    with pytest.raises(KeyboardInterrupt):
        run_training(*parse_train_args(argv(pt_dir, out, *extra)))
    assert (out / "checkpoint-2" / COMPLETE_MARKER).is_file()
    monkeypatch.setattr(yak.training.trainer, "atomic_write_json", write)
    run_training(*parse_train_args(argv(pt_dir, out, *extra)))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-6"]


def test_bad_options_are_explained_before_anything_runs(pt_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(YakError, match="not from a Yak run"):
        run_training(*parse_train_args(argv(pt_dir, out, "--max_steps", "1")))
    with pytest.raises(YakError) as e:
        run_training(
            *parse_train_args(
                argv(
                    pt_dir,
                    tmp_path / "x",
                    "--block_size",
                    "1024",
                    "--torch_dtype",
                    "float16",
                    "--bf16",
                    "--loraplus_lr_ratio",
                    "0.5",
                    "--max_steps",
                    "5",
                    "--max_train_tokens",
                    "1000",
                    "--lora_rank",
                    "0",
                    "--lora_dropout",
                    "1.5",
                    "--embedding_learning_rate",
                    "0",
                )
            )
        )
    message = str(e.value)
    # these were peft / torch tracebacks after the model had loaded (or, lr 0, silently --learning_rate)
    assert "--lora_rank must be at least 1" in message and "--lora_dropout must be in [0, 1)" in message
    assert "--embedding_learning_rate must be positive" in message
    with pytest.raises(YakError, match="--max_train_tokens must be a positive"):  # was: 3 epochs instead
        run_training(*parse_train_args(argv(pt_dir, tmp_path / "x", "--max_train_tokens", "0")))
    with pytest.raises(YakError, match="--block_size 1 must be at least 2"):  # trained on nothing, loss 0.0
        run_training(*parse_train_args(argv(pt_dir, tmp_path / "x", "--block_size", "1")))
    with pytest.raises(YakError, match="float16 trains on GPUs only"):  # was a dtype traceback at step 1
        run_training(*parse_train_args(argv(pt_dir, tmp_path / "x", "--torch_dtype", "float16")))
    with pytest.raises(YakError, match="--new_rows_init random initialises new rows of a base model"):
        run_training(*parse_train_args(argv(pt_dir, tmp_path / "x", "--new_rows_init", "random", "--adapters", str(out))))
    assert "--block_size 1024 is longer than the model's context (512 positions" in message
    assert "--bf16 with float16 weights" in message and "--loraplus_lr_ratio must be >= 1" in message
    assert "either --max_train_tokens or --max_steps" in message
    # --report_to: the Trainer would refuse these only after tokenizing and loading the model
    from transformers.integrations import INTEGRATION_TO_CALLBACK, get_available_reporting_integrations

    absent = next(n for n in INTEGRATION_TO_CALLBACK if n not in get_available_reporting_integrations())
    for name, found in [("no_such_tracker", "unknown"), (absent, "its package is not installed")]:
        with pytest.raises(YakError, match=f"--report_to {name}: {found}; choose none, all .*wandb"):
            run_training(*parse_train_args(argv(pt_dir, tmp_path / "x", "--report_to", name)))
    assert not (tmp_path / "x").exists()
    with pytest.raises(YakError, match="not used.*--no_such_option"):
        parse_train_args(argv(pt_dir, out, "--no_such_option", "1"))
    # a tokenizer that is not an extension of the model's (here: the model's own is smaller than the base given)
    with pytest.raises(YakError, match="has 512 tokens, fewer than the 3512"):
        run_training(
            *parse_train_args(
                argv(
                    pt_dir,
                    tmp_path / "y",
                    "--tokenizer_name_or_path",
                    str(ROOT / "models" / "stories260K"),
                    "--base_tokenizer_name_or_path",
                    str(MERGED_TOKENIZER),
                )
            )
        )
    # evaluation without validation data (the Trainer's ValueError came after the model was loaded)
    with pytest.raises(YakError, match="--eval_strategy steps needs validation data"):
        run_training(
            *parse_train_args(
                argv(pt_dir, tmp_path / "z", "--validation_split_percentage", "0", "--eval_strategy", "steps")
            )
        )
    # the runs above stopped before training: they left nothing (no run file, no lock), and the corrected command
    # may use the folder
    assert not (tmp_path / "y").exists() and not (tmp_path / "z").exists()
    assert not list(tmp_path.glob(".*.lock"))
    run_training(*parse_train_args(argv(pt_dir, tmp_path / "y", "--stage", "1", "--max_steps", "1")))
    assert (tmp_path / "y" / "yak_adapter.json").is_file()
    # another run's folder: a stage-1 folder is not continued as stage 2
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "yak_run.json").write_text(json.dumps({"identity": {"task": "pt", "stage": 1}}))
    (tmp_path / "other" / "checkpoint-1").mkdir()
    (tmp_path / "other" / "checkpoint-1" / COMPLETE_MARKER).write_text("{}")
    with pytest.raises(YakError, match=r"holds another run, with other settings:\n  - stage: 1 there, 2 now\nA"):
        run_training(*parse_train_args(argv(pt_dir, tmp_path / "other", "--max_steps", "1")))
    # nor the checkpoint it is asked to resume from
    with pytest.raises(YakError, match="inside output_dir"):
        run_training(
            *parse_train_args(
                argv(
                    pt_dir,
                    tmp_path / "other",
                    "--resume_from_checkpoint",
                    str(tmp_path / "other" / "checkpoint-1"),
                    "--overwrite_output_dir",
                )
            )
        )
    assert (tmp_path / "other" / "checkpoint-1" / COMPLETE_MARKER).is_file()
    # a stage-2 run from a stage-1 checkpoint (was a FileNotFoundError traceback after the data and model)
    save_embeddings(load_base_model(ROOT / "models" / "stories260K"), tmp_path / "other" / "checkpoint-1", "m")
    with pytest.raises(YakError, match="is a checkpoint of stage 1, and this run is a LoRA run"):
        run_training(
            *parse_train_args(
                argv(pt_dir, tmp_path / "w", "--resume_from_checkpoint", str(tmp_path / "other" / "checkpoint-1"))
            )
        )
    for name in ("yak_adapter.json", "embeddings.safetensors"):
        (tmp_path / "other" / "checkpoint-1" / name).unlink()
    # --overwrite_output_dir must not delete an input: here the stage-1 output given as --adapters
    (tmp_path / "other" / "yak_adapter.json").write_text("{}")
    with pytest.raises(YakError, match="is .or contains. the input"):
        run_training(
            *parse_train_args(
                argv(
                    pt_dir,
                    tmp_path / "other",
                    "--adapters",
                    str(tmp_path / "other"),
                    "--overwrite_output_dir",
                )
            )
        )
    assert (tmp_path / "other" / "yak_adapter.json").is_file()
    # nor the training data kept inside it
    shutil.copytree(pt_dir, tmp_path / "other" / "data")
    with pytest.raises(YakError, match="is .or contains. the input"):
        run_training(*parse_train_args(argv(tmp_path / "other" / "data", tmp_path / "other", "--overwrite_output_dir")))
    assert (tmp_path / "other" / "data" / "bo" / "mila.txt").is_file()


def test_load_in_kbits_is_checked_before_the_data_work(pt_dir, tmp_path):
    """A --load_in_kbits that cannot load (a value argparse never sees, from Python; 4 bits without
    bitsandbytes) was refused only when the model loaded, after the data had been tokenized."""
    import importlib.util

    a = argv(pt_dir, tmp_path / "out", "--data_cache_dir", str(tmp_path / "cache"), "--load_in_kbits", "4")
    source, stage_args, data_args, training_args = parse_train_args(a)
    cases = [(5, "--load_in_kbits must be 4, 8 or 16, got 5")]
    if importlib.util.find_spec("bitsandbytes") is None:
        cases.append((4, "--load_in_kbits 4 needs the bitsandbytes package"))
    for bits, error in cases:
        stage_args.load_in_kbits = bits
        with pytest.raises(YakError, match=error):
            run_training(source, stage_args, data_args, training_args)
        assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()


def test_config_file_and_help(tmp_path, pt_dir):
    config = {
        "model_name_or_path": str(ROOT / "models" / "stories260K"),
        "task": "pt",
        "stage": 1,
        "dataset_dir": str(pt_dir),
        "block_size": 64,
        "output_dir": str(tmp_path / "o"),
        "use_cpu": True,
        "loraplus_lr_ratio": 8,
    }
    (tmp_path / "c.json").write_text(json.dumps(config))
    source, stage_args, data_args, training_args = parse_train_args([str(tmp_path / "c.json")])
    assert stage_args.stage == 1 and stage_args.loraplus_lr_ratio == 8 and data_args.block_size == 64
    assert training_args.use_cpu and source.base_model == config["model_name_or_path"]  # the original's key
    (tmp_path / "bad.json").write_text(json.dumps({**config, "lora_rnak": 8}))
    with pytest.raises(YakError, match="lora_rnak"):
        parse_train_args([str(tmp_path / "bad.json")])
    for name, text in [
        ("broken.yaml", "task: [sft\n"),
        ("list.json", "[1, 2]"),
        ("stage3.json", json.dumps({**config, "stage": 3})),
    ]:
        (tmp_path / name).write_text(text)
        with pytest.raises(YakError, match=name):
            parse_train_args([str(tmp_path / name)])
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--help"],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        timeout=120,
    )
    assert (
        result.returncode == 0
        and "Continued pretraining" in result.stdout
        and "--loraplus_lr_ratio" in result.stdout
    )


def test_schedule_refuses_endless_warmup_and_counts_tokens(tmp_path):
    args = cpu_args(
        tmp_path, num_train_epochs=100000, per_device_train_batch_size=12, gradient_accumulation_steps=8
    )
    with pytest.raises(
        YakError,
        match=r"100000 gives 123,400,000 steps \(1,234 per epoch.*warm-up lasts "
        r"6,170,000 steps = 5,000.0 epochs",
    ):
        resolve_schedule(args, StageArguments(warmup_ratio=0.05), n_train=1234 * 96, tokens_per_sample=256)
    args = cpu_args(tmp_path, per_device_train_batch_size=12, warmup_steps=100, gradient_accumulation_steps=8)
    fixed, summary = resolve_schedule(
        args, StageArguments(max_train_tokens=10_000_000), n_train=10**6, tokens_per_sample=256
    )
    assert fixed.max_steps == summary["steps"] == 407  # ceil(1e7 / (12 * 8 * 256))
    assert summary["warmup_steps"] == 100


def test_schedule_by_epochs_counts_the_steps_the_trainer_takes(tmp_path):
    """With batches per epoch not a multiple of the accumulation, the Trainer takes a last shorter step;
    the logged schedule (and a warm-up ratio converted to steps) must count it."""
    pt = tmp_path / "pt"
    pt.mkdir()
    lines = (PT_DATA / "bo" / "mila.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    (pt / "bo.txt").write_text("".join(lines[:5]), encoding="utf-8")
    summary = run_training(
        *parse_train_args(
            argv(pt, tmp_path / "out", "--stage", "1", "--per_device_train_batch_size", "2",
                 "--gradient_accumulation_steps", "3", "--num_train_epochs", "2")
        )
    )
    assert summary["global_step"] == summary["steps"] == 2 * summary["steps_per_epoch"]
    assert summary["steps_per_epoch"] == 5  # 27 blocks = 14 batches of 2 = 4 accumulations of 3 + 1 of 2


def test_loraplus_groups_keep_embeddings_out_of_the_A_group(tiny_model_dir, tmp_path):
    model = load_base_model(tiny_model_dir)
    model = prepare_lora(
        model,
        rank=4,
        alpha=8,
        dropout=0.0,
        target_modules=["q_proj", "v_proj"],
        modules_to_save=["embed_tokens", "lm_head"],
    )
    args = cpu_args(tmp_path, learning_rate=2e-4, weight_decay=0.01)
    decay = {n for n, _ in model.named_parameters() if "lora_B" not in n}  # B without decay: a 4th group
    groups = {
        g["name"]: g
        for g in optimizer_groups(
            model, args, loraplus_lr_ratio=16, embedding_learning_rate=1e-5, decay_names=decay
        )
    }
    names = {id(p): n for n, p in model.named_parameters()}
    assert set(groups) == {"lora_A", "lora_B_no_decay", "embeddings"}
    assert groups["lora_A"]["lr"] == 2e-4 and groups["lora_B_no_decay"]["lr"] == pytest.approx(3.2e-3)
    assert groups["embeddings"]["lr"] == 1e-5
    assert groups["lora_A"]["weight_decay"] == 0.01 and groups["lora_B_no_decay"]["weight_decay"] == 0.0
    assert all("lora_A" in names[id(p)] for p in groups["lora_A"]["params"])
    assert all("lora_B" in names[id(p)] for p in groups["lora_B_no_decay"]["params"])
    assert [names[id(p)] for p in groups["embeddings"]["params"]] == [
        "base_model.model.model.embed_tokens.modules_to_save.default.weight"
    ]  # tied: one matrix
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(p.numel() for g in groups.values() for p in g["params"]) == trainable


@pytest.mark.parametrize("stage", [1, 2])
def test_bf16_model_keeps_a_bf16_residual_stream_with_fp32_trained_embeddings(stage, tmp_path):
    """Trained weights are fp32 master copies, but the hidden states stay in the frozen weights' dtype (as in
    the bf16 model the base is and that inference runs), while gradients still reach the fp32 rows."""
    source = ModelSource(
        base_model=str(ROOT / "models" / "stories260K"), tokenizer_path=str(MERGED_TOKENIZER), dtype="bfloat16"
    )
    stage_args = StageArguments(task="pt", stage=stage, lora_rank=4, lora_alpha=8)
    model = build_model(
        source, stage_args, load_tokenizer(MERGED_TOKENIZER), cpu_args(tmp_path, bf16=True)
    )
    embeddings = model.get_input_embeddings().weight
    assert embeddings.dtype == torch.float32 and embeddings.requires_grad
    seen = []
    layer = (model.get_base_model() if stage == 2 else model).model.layers[0]
    layer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True
    )
    ids = torch.tensor([[1, 300, 3000, 3500]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert seen[0].dtype == torch.bfloat16
    assert embeddings.grad.dtype == torch.float32 and embeddings.grad[3500].abs().sum() > 0


def _deepspeed(config: str, pt_dir, out, *extra) -> subprocess.CompletedProcess:
    """A real DeepSpeed run of train.py: two processes over gloo on the CPU, launched by torchrun."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train.py"), *argv(pt_dir, out, "--deepspeed", str(ROOT / config), "--save_steps", "2",
                                         "--learning_rate", "1e-3", *extra)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _zero_weights(checkpoint) -> dict[str, torch.Tensor]:
    """The trained fp32 weights that DeepSpeed's optimizer holds, gathered from every rank's shard."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint))


def test_deepspeed_zero2_saves_complete_embeddings_and_resumes(pt_dir, tmp_path):
    """Stage 2 (LoRA+ and embeddings) under ZeRO-2, as run_pt.sh runs it on GPUs (issue 19's CPU part).

    The saved adapter holds embed_tokens and lm_head whole (every vocabulary row) and equal to the weights of
    DeepSpeed's optimizer, whose shards are split between the ranks; a run that dies after a checkpoint resumes
    from DeepSpeed's shards with the uninterrupted run's losses. (--compile_layers with DeepSpeed is checked on
    GPUs, bench/gpu_checks.sh: compiling on the CPU costs CI about 90 s.)
    """
    out = tmp_path / "ds"
    extra = ["--stage", "2", "--max_steps", "4", "--lora_rank", "4", "--lora_alpha", "8"]
    result = _deepspeed("ds_z2_config.json", pt_dir, out, *extra)
    assert (out / "checkpoint-2" / COMPLETE_MARKER).is_file()
    assert any((out / "checkpoint-2").glob("global_step*"))  # DeepSpeed's own optimizer shards
    assert "optimizer group lora_B" in result.stderr  # our LoRA+ groups, not a DeepSpeed optimizer
    saved = load_file(str(out / "adapter_model.safetensors"))
    trained = _zero_weights(out / "checkpoint-4")  # the last step's
    for name in ("model.embed_tokens", "lm_head"):
        weight = saved[f"base_model.model.{name}.weight"]
        assert weight.shape == (3520, 64) and weight.abs().sum(1).min() > 0  # complete, no empty rows
        assert torch.equal(weight, trained[f"base_model.model.{name}.modules_to_save.default.weight"])
    model, tok = load_model_and_tokenizer(ModelSource(ROOT / "models" / "stories260K", [out]), device="cpu")
    assert torch.equal(model.get_input_embeddings().weight, saved["base_model.model.model.embed_tokens.weight"])
    assert len(tok) == 3512

    # the same run dying after checkpoint-2: no checkpoint-4, no final output
    shutil.rmtree(out / "checkpoint-4")
    for name in ("adapter_config.json", "adapter_model.safetensors", "yak_adapter.json"):
        (out / name).unlink(missing_ok=True)
    resumed = _deepspeed("ds_z2_config.json", pt_dir, out, *extra)
    assert f"resuming from {out / 'checkpoint-2'}" in resumed.stderr

    def losses(run):
        return re.findall(r"'loss': '([0-9.]+)'", run.stdout + run.stderr)

    assert len(losses(result)) == 4 and losses(resumed) == losses(result)[2:]


def test_deepspeed_zero3_saves_complete_embeddings(pt_dir, tmp_path):
    """Stage 1 under ZeRO-3, which partitions the weights themselves between the ranks: the saved embeddings
    are still whole and equal to the trained ones (peers saved them empty)."""
    out = tmp_path / "ds"
    _deepspeed("ds_z3_config.json", pt_dir, out, "--stage", "1", "--max_steps", "2")
    embeddings = load_file(str(out / "embeddings.safetensors"))["model.embed_tokens.weight"]
    assert embeddings.shape == (3520, 64) and embeddings.abs().sum(1).min() > 0  # complete, no empty rows
    assert torch.equal(embeddings, _zero_weights(out / "checkpoint-2")["model.embed_tokens.weight"])
    model, tok = load_model_and_tokenizer(ModelSource(ROOT / "models" / "stories260K", [out]), device="cpu")
    assert torch.equal(model.get_input_embeddings().weight, embeddings) and len(tok) == 3512


def test_sft_task_on_top_of_continued_pretraining(tmp_path):
    """--task sft with yak.sft's data: LoRA+ on the chat data, starting from a CPT output."""
    common = [
        "--model_name_or_path",
        str(ROOT / "models" / "stories260K"),
        "--use_cpu",
        "--report_to",
        "none",
        "--per_device_train_batch_size",
        "4",
        "--logging_steps",
        "1",
        "--lora_rank",
        "4",
        "--lora_alpha",
        "8",
        "--seed",
        "3",
        "--plot_loss",
        "false",
    ]
    pt = tmp_path / "pt"
    pt.mkdir()
    (pt / "bo.txt").write_text(
        "".join((PT_DATA / "bo" / "mila.txt").read_text(encoding="utf-8").splitlines(keepends=True)[:5]),
        encoding="utf-8",
    )
    run_training(
        *parse_train_args(
            [
                "--tokenizer_name_or_path",
                str(MERGED_TOKENIZER),
                "--dataset_dir",
                str(pt),
                "--data_cache_dir",
                str(tmp_path / "c"),
                "--block_size",
                "64",
                "--max_steps",
                "2",
                "--output_dir",
                str(tmp_path / "cpt"),
                *common,
            ]
        )
    )
    summary = run_training(
        *parse_train_args(
            [
                "--task",
                "sft",
                "--adapters",
                str(tmp_path / "cpt"),
                "--dataset_dir",
                str(ROOT / "data" / "sft"),
                "--data_cache_dir",
                str(tmp_path / "c"),
                "--max_seq_length",
                "256",
                "--max_steps",
                "12",
                "--learning_rate",
                "2e-3",
                "--output_dir",
                str(tmp_path / "sft"),
                *common,
            ]
        )
    )
    losses = summary["losses"]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5
    assert (tmp_path / "sft" / "adapter_model.safetensors").is_file()
    _, tok = load_model_and_tokenizer(ModelSource(ROOT / "models" / "stories260K", [tmp_path / "cpt", tmp_path / "sft"]), device="cpu")
    assert len(tok) == 3512 and tok.chat_template


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_fast_path_follows_the_plain_losses(device, pt_dir, tmp_path):
    """The speed options (--compile_layers, no gradient checkpointing) keep the training semantics: from the
    same weights and data they give the plain path's losses (gradient checkpointing, eager) — 10 steps in fp32
    on the CPU (rel 1e-4), 50 steps in bf16 on a GPU, within the noise of training there. LoRA dropout is off:
    compiled dropout draws its masks from inductor's own random generator, equally random but not the same masks.

    The GPU bound is measured, not guessed (bench/loss_paths.py, H100, 2026-12-06, bench/RESULTS.md): the plain
    path against itself reseeded gives identical losses, so the data order is fixed; the compiled path differs
    from it by rounding alone (bf16 kernels fused in another order): mean 0.54%, largest 3.58% (1 of 50 steps
    over 2%), which made a flat 2% bound fail. The noise of training itself, the plain path with other dropout
    masks, is larger: mean 0.79%, largest 4.75% (2 of 50 over 2%). So: mean within 1%, every step within 5%."""
    steps = 10 if device == "cpu" else 50
    extra = ["--stage", "2", "--max_steps", str(steps), "--lora_rank", "4", "--lora_alpha", "8",
             "--lora_dropout", "0", "--learning_rate", "2e-3"] + (["--torch_dtype", "bfloat16"] if device == "cuda" else [])

    def losses(name, *options):
        a = [x for x in argv(pt_dir, tmp_path / name, *extra, *options) if device == "cpu" or x != "--use_cpu"]
        return run_training(*parse_train_args(a))["losses"]

    plain = losses("plain", "--gradient_checkpointing")
    fast = losses("fast", "--compile_layers")
    assert len(fast) == steps
    if device == "cpu":
        assert fast == pytest.approx(plain, rel=1e-4)
    else:
        gaps = [abs(f - p) / abs(p) for f, p in zip(fast, plain, strict=True)]
        assert sum(gaps) / len(gaps) < 0.01 and max(gaps) < 0.05, gaps


@pytest.mark.gpu
def test_stage2_bf16_gradient_checkpointing_on_gpu(pt_dir, tmp_path):
    out = tmp_path / "gpu"
    a = [
        x
        for x in argv(
            pt_dir,
            out,
            "--stage",
            "2",
            "--max_steps",
            "5",
            "--torch_dtype",
            "bfloat16",
            "--gradient_checkpointing",
            "--lora_rank",
            "8",
            "--lora_alpha",
            "16",
        )
        if x != "--use_cpu"
    ]
    summary = run_training(*parse_train_args(a))
    assert summary["global_step"] == 5 and all(math.isfinite(x) for x in summary["losses"])
    model, _ = load_model_and_tokenizer(ModelSource(ROOT / "models" / "stories260K", [out], dtype="bfloat16"))
    assert model.device.type == "cuda" and model.dtype == torch.bfloat16


@pytest.mark.slow
def test_run_pt_sh_on_cpu(tmp_path):
    """run_pt.sh: stage 1 then stage 2 of the tiny model on data/pt, on the CPU, with its variables set."""
    env = {
        **os.environ,
        "OUT": str(tmp_path / "pt"),
        "CACHE": str(tmp_path / "cache"),
        "MASTER_PORT": str(29600 + os.getpid() % 1000),
        # the CPU defaults used to overwrite these: 51,200 tokens in 64-token blocks, no accumulation
        "BLOCK_SIZE": "32", "GRAD_ACC": "2", "STAGE1_TOKENS": "40960",
    }  # fmt: skip
    result = subprocess.run(
        ["bash", str(ROOT / "run_pt.sh")], capture_output=True, text=True, check=False, env=env, timeout=1200
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "32-token blocks" in result.stderr
    # 40,960 and (the CPU default) 51,200 tokens / (8 blocks x 2 accumulated x 32 tokens)
    assert "schedule: 80 steps" in result.stderr and "schedule: 100 steps" in result.stderr
    for stage in ("stage1", "stage2"):
        assert (tmp_path / "pt" / stage / "loss.png").is_file()
    # a crash in stage 2 after its checkpoint, then the same command: stage 1 is not refused as finished
    (tmp_path / "pt" / "stage2" / "adapter_config.json").unlink()
    result = subprocess.run(
        ["bash", str(ROOT / "run_pt.sh")], capture_output=True, text=True, check=False, env=env, timeout=1200
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "stage 1 already finished" in result.stdout and "resuming from" in result.stderr
    assert (tmp_path / "pt" / "stage2" / "adapter_config.json").is_file()
    model, tok = load_model_and_tokenizer(ModelSource(ROOT / "models" / "stories260K", [tmp_path / "pt" / "stage1", tmp_path / "pt" / "stage2"]), device="cpu")
    heldout = (HELDOUT / "bo_modern_nanhai_deseg_heldout.txt").read_text(encoding="utf-8")[:3000]
    assert _loss(model, tok, heldout) < 12  # the resized base model: about 23.6


def test_run_pt_sh_with_overwrite_trains_stage_1_again(tmp_path):
    """run_pt.sh --overwrite_output_dir starts both stages again: it skipped a finished stage 1 and trained
    stage 2 on it (a new TOKENIZER or stage-1 setting was ignored). A refused option stops it early here."""
    (tmp_path / "pt" / "stage1").mkdir(parents=True)
    (tmp_path / "pt" / "stage1" / "yak_adapter.json").write_text("{}")  # a finished stage 1
    env = {**os.environ, "OUT": str(tmp_path / "pt"), "CACHE": str(tmp_path / "cache")}
    args = ["--overwrite_output_dir", "--max_train_tokens", "0"]
    result = subprocess.run(["bash", str(ROOT / "run_pt.sh"), *args], capture_output=True, text=True,
                            check=False, env=env, timeout=300)
    assert result.returncode != 0 and "--max_train_tokens must be a positive number" in result.stderr
    assert "stage 1 already finished" not in result.stdout


def test_untied_model_without_lm_head_in_modules_to_save_is_refused_before_training(
    untied_model_dir, pt_dir, tmp_path
):
    """An untied model whose vocabulary grows needs its new lm_head rows in the adapter; without them the
    output could never be loaded or merged (both refuse it), so training refuses before it starts."""
    a = argv(pt_dir, tmp_path / "out", "--stage", "2", "--max_steps", "1", "--modules_to_save", "embed_tokens")
    a[a.index("--model_name_or_path") + 1] = str(untied_model_dir)
    with pytest.raises(YakError, match="lm_head"):
        run_training(*parse_train_args(a))
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()
    a[a.index("--modules_to_save") + 1] = "embed_tokens,lm_head"
    a[a.index("--output_dir") + 1] = str(tmp_path / "with_lm_head")
    assert run_training(*parse_train_args(a))["global_step"] == 1
    # tied: without embed_tokens the new rows were lost too (the adapter trained, then could not be loaded)
    tied = argv(pt_dir, tmp_path / "tied", "--stage", "2", "--max_steps", "1", "--modules_to_save", "")
    with pytest.raises(YakError, match="does not train embed_tokens and no --adapters"):
        run_training(*parse_train_args(tied))
    assert not (tmp_path / "tied" / "adapter_model.safetensors").exists()


def test_liger_rms_norm_is_refused_inside_compiled_layers(pt_dir, tmp_path):
    """Liger's RMSNorm failed to compile inside --compile_layers on a GPU (issue 15): refused up front, with
    the way out; with rms_norm off (an options file, since the option is a dict) the check passes."""
    from yak.training.arguments import check_args

    args = argv(pt_dir, tmp_path / "x", "--compile_layers", "--use_liger_kernel")
    with pytest.raises(YakError, match=r"--use_liger_kernel with --compile_layers: Liger's RMSNorm.*rms_norm"):
        run_training(*parse_train_args(args))
    assert not (tmp_path / "x").exists()
    config = {"model_name_or_path": str(ROOT / "models" / "stories260K"), "tokenizer_name_or_path": str(MERGED_TOKENIZER),
              "dataset_dir": str(pt_dir), "output_dir": str(tmp_path / "x"), "use_cpu": True, "report_to": "none",
              "compile_layers": True, "use_liger_kernel": True, "liger_kernel_config": {"rms_norm": False}}
    (tmp_path / "options.json").write_text(json.dumps(config))
    check_args(*parse_train_args([str(tmp_path / "options.json")]))
