"""What the tools read, and how: no code from data, adapters only on their own base, broken files explained.

Issue 13, cases 3, 4 and 5, done for real: pickles that would write a marker file planted where a resume reads
them, a real adapter trained for a second tiny base with more layers, real files cut short; the command-line
cases run the shipped scripts as subprocesses.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, LlamaForCausalLM

from tests.conftest import PT_DATA, ROOT, TINY_MODEL
from yak import YakError
from yak.formats import BASE_FILE, base_record, tokenizer_dir
from yak.modeling import load_model_and_tokenizer
from yak.safe_load import check_pickles, guard_deepspeed, torch_load
from yak.source import ModelSource
from yak.training import parse_train_args, run_training

MERGED_TOKENIZER = ROOT / "tokenizer" / "stories260K_bo" / "merged_tokenizer_hf"
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


class Payload:
    """Unpickling this runs ``touch MARKER``: what a planted checkpoint file would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state": Payload(marker)}, path)


@pytest.fixture(scope="module")
def pt_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("pt")
    (root / "en").mkdir()
    lines = (PT_DATA / "en/austen_pride_and_prejudice.txt").read_text(encoding="utf-8").splitlines(True)[:200]
    (root / "en" / "austen.txt").write_text("".join(lines), encoding="utf-8")
    return root


def argv(pt_dir: Path, base: Path, out: Path, *extra: str) -> list[str]:
    return ["--model_name_or_path", str(base), "--tokenizer_name_or_path", str(MERGED_TOKENIZER),
            "--dataset_dir", str(pt_dir), "--data_cache_dir", str(pt_dir.parent / "cache"), "--block_size", "64",
            "--per_device_train_batch_size", "4", "--output_dir", str(out), "--use_cpu", "--report_to", "none",
            "--logging_steps", "1", "--seed", "7", "--dataloader_num_workers", "0", "--plot_loss", "false",
            "--stage", "2", "--max_steps", "2", "--save_steps", "2", "--lora_rank", "4", "--lora_alpha", "8",
            "--modules_to_save", "embed_tokens", *extra]


@pytest.fixture(scope="module")
def deep_base(tmp_path_factory) -> Path:
    """A second tiny base: the tiny model's config with 8 layers instead of 5 (same hidden size), saved."""
    out = tmp_path_factory.mktemp("deep_base")
    config = AutoConfig.from_pretrained(TINY_MODEL)
    config.num_hidden_layers = 8
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(TINY_MODEL / name, out / name)
    return out


@pytest.fixture(scope="module")
def runs(pt_dir, deep_base, tmp_path_factory):
    """Real stage-2 runs (2 steps, a checkpoint at step 2) on the tiny model and on the 8-layer base."""
    root = tmp_path_factory.mktemp("runs")
    for name, base in (("tiny", TINY_MODEL), ("deep", deep_base)):
        run_training(*parse_train_args(argv(pt_dir, base, root / name)))
    return root


def test_outputs_record_their_base(runs, deep_base):
    for name, base in (("tiny", TINY_MODEL), ("deep", deep_base)):
        for folder in (runs / name, runs / name / "checkpoint-2"):
            recorded = json.loads((folder / BASE_FILE).read_text())
            assert recorded == base_record(base)
    assert json.loads((runs / "deep" / BASE_FILE).read_text())["num_hidden_layers"] == 8


# ------------------------------------------------------------------------------------------------ case 3


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "rng_state.pth",
                                  "global_step2/mp_rank_00_model_states.pt",
                                  "global_step2/zero_pp_rank_0_mp_rank_00_optim_states.pt"])
def test_planted_pickle_in_a_checkpoint_is_refused_and_never_runs(runs, tmp_path, name):
    checkpoint = tmp_path / "checkpoint-2"
    shutil.copytree(runs / "tiny" / "checkpoint-2", checkpoint)
    check_pickles(checkpoint)  # the real one passes
    marker = tmp_path / "MARKER"
    plant(checkpoint / name, marker)
    with pytest.raises(YakError, match=rf"{name} is refused: it imports posix.system when unpickled.*"
                                       r"YAK_TRUST_PICKLE=1") as e:
        check_pickles(checkpoint)
    assert "\n" not in str(e.value)
    with pytest.raises(YakError, match="is refused"):
        torch_load(checkpoint / name)
    assert not marker.exists()


def test_train_py_resume_refuses_a_planted_optimizer_state(runs, pt_dir, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(runs / "tiny", out)
    for name in ("adapter_config.json", "adapter_model.safetensors"):  # it died after checkpoint-2
        (out / name).unlink()
    marker = tmp_path / "MARKER"
    plant(out / "checkpoint-2" / "optimizer.pt", marker)
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), *argv(pt_dir, TINY_MODEL, out)],
                          capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300, check=False)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert "checkpoint-2/optimizer.pt is refused: it imports posix.system" in done.stderr
    assert not marker.exists()


def test_deepspeed_reads_its_states_weights_only(tmp_path, monkeypatch, caplog):
    """DeepSpeed's own loader, hooked: exactly the types it stores load; a payload is refused unless trusted."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    monkeypatch.setattr(TorchCheckpointEngine, "load", TorchCheckpointEngine.load)  # restored afterwards
    guard_deepspeed()
    engine = TorchCheckpointEngine()
    states = {"optimizer_state_dict": {"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.gradients,
                                       "param_slice_mappings": [{"w": fragment_address(numel=4, start=0)}]},
              "module": {"w": torch.arange(4.0)}}
    torch.save(states, tmp_path / "states.pt")
    loaded = engine.load(str(tmp_path / "states.pt"))
    assert loaded["optimizer_state_dict"]["zero_stage"] is ZeroStageEnum.gradients
    assert loaded["optimizer_state_dict"]["loss_scaler"].cur_scale == 1.0
    assert torch.equal(loaded["module"]["w"], torch.arange(4.0))
    marker = tmp_path / "MARKER"
    plant(tmp_path / "mp_rank_00_model_states.pt", marker)
    with pytest.raises(YakError, match="mp_rank_00_model_states.pt is refused"):
        engine.load(str(tmp_path / "mp_rank_00_model_states.pt"))
    assert not marker.exists()
    # the opt-in: any pickle loads (a harmless one here), and the log says so
    torch.save({"x": Fraction(1, 3)}, tmp_path / "other.pt")
    with pytest.raises(YakError, match="imports fractions.Fraction"):
        engine.load(str(tmp_path / "other.pt"))
    monkeypatch.setenv("YAK_TRUST_PICKLE", "1")
    assert engine.load(str(tmp_path / "other.pt")) == {"x": Fraction(1, 3)}
    assert "YAK_TRUST_PICKLE=1: loading" in caplog.text


# ------------------------------------------------------------------------------------------------ case 4


def test_adapter_for_another_base_is_refused_naming_both(runs, deep_base, tmp_path, caplog, pt_dir):
    from yak.merge import MergeArguments, merge

    deep = runs / "deep"
    with pytest.raises(YakError, match=rf"{deep} was trained for the base {deep_base} \(8 layers.*but the base "
                                       rf"given is {TINY_MODEL} \(5 layers") as e:
        load_model_and_tokenizer(ModelSource(TINY_MODEL, [deep]))
    assert "\n" not in str(e.value)
    with pytest.raises(YakError, match="was trained for the base"):
        merge(ModelSource(TINY_MODEL, [deep]), MergeArguments(output_dir=str(tmp_path / "m")))
    with pytest.raises(YakError, match="--adapters: .* was trained for the base"):  # stage 2 on another stage 1
        run_training(*parse_train_args(argv(pt_dir, TINY_MODEL, tmp_path / "t", "--adapters", str(deep))))
    # made elsewhere (no record): the shapes still tell, and a warning says only they were checked
    bare = tmp_path / "bare"
    shutil.copytree(deep, bare)
    (bare / BASE_FILE).unlink()
    with pytest.raises(YakError, match=r"bare has weights for \d+ modules that the base .* \(5 layers\) lacks, "
                                       r"e.g. model.layers.5"):
        load_model_and_tokenizer(ModelSource(TINY_MODEL, [bare]))
    assert f"bare has no {BASE_FILE}" in caplog.text
    fewer = tmp_path / "fewer"  # the other way round: an adapter of 5 layers on the 8-layer base
    shutil.copytree(runs / "tiny", fewer)
    (fewer / BASE_FILE).unlink()
    with pytest.raises(YakError, match=r"fewer has LoRA weights for 5 layers, the base .* has 8"):
        load_model_and_tokenizer(ModelSource(deep_base, [fewer]))
    # same shapes, another tokenizer: only the record can tell
    other_tok = tmp_path / "other_tok"
    shutil.copytree(TINY_MODEL, other_tok)
    for f in MERGED_TOKENIZER.iterdir():
        shutil.copy(f, other_tok / f.name)
    with pytest.raises(YakError, match=r"trained for the base .*tokenizer [0-9a-f]{12}\), but the base given"):
        load_model_and_tokenizer(ModelSource(other_tok, [runs / "tiny"]))
    model, _ = load_model_and_tokenizer(ModelSource(deep_base, [deep]))  # on its own base it loads
    assert len(model.model.layers) == 8


def test_a_merged_model_answers_with_its_base(runs, tmp_path):
    from yak.merge import MergeArguments, merge

    merged = merge(ModelSource(TINY_MODEL, [runs / "tiny"]), MergeArguments(output_dir=str(tmp_path / "merged")))
    assert json.loads((merged / "yak_merge.json").read_text())["base_record"] == base_record(TINY_MODEL)
    assert base_record(merged) == base_record(TINY_MODEL)


def test_inference_and_evaluate_refuse_an_adapter_of_another_base(runs, deep_base, tmp_path):
    deep = runs / "deep"
    (tmp_path / "in.txt").write_text("Once upon a time\n", encoding="utf-8")
    done = subprocess.run([sys.executable, str(ROOT / "inference_hf.py"), "--base_model", str(TINY_MODEL),
                           "--lora_model", str(deep), "--only_cpu", "--data_file", str(tmp_path / "in.txt"),
                           "--predictions_file", str(tmp_path / "out.jsonl")],
                          capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300, check=False)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert f"{deep} was trained for the base {deep_base} (8 layers" in done.stderr
    assert not (tmp_path / "out.jsonl").exists()
    broken = tmp_path / "broken"  # and a second model whose weights were cut short: both reported up front
    shutil.copytree(TINY_MODEL, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    done = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--models", f"wrong={TINY_MODEL},{deep}",
                           f"cut={broken}", "--tasks", "heldout", "--output_dir", str(tmp_path / "eval")],
                          capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300, check=False)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert f"model wrong: {deep} was trained for the base {deep_base}" in done.stderr
    assert f"model cut: {broken / 'model.safetensors'} cannot be read" in done.stderr
    assert not (tmp_path / "eval").exists()


# ------------------------------------------------------------------------------------------------ case 5


def cut(src: Path, dst: Path, name: str) -> Path:
    """A copy of the folder ``src`` whose file ``name`` lost its second half (an interrupted copy)."""
    shutil.copytree(src, dst)
    data = (dst / name).read_bytes()
    (dst / name).write_bytes(data[: len(data) // 2])
    return dst


@pytest.mark.parametrize("folder, name", [(TINY_MODEL, "model.safetensors"), (TINY_MODEL, "config.json"),
                                          (TINY_MODEL, "tokenizer.model"), (MERGED_TOKENIZER, "tokenizer.json")])
def test_a_file_cut_short_is_one_line_naming_it(folder, name, tmp_path, pt_dir):
    broken = cut(folder, tmp_path / "broken", name)
    fix = "cut short or corrupt .*copy it again or re-run the step that wrote it"
    if folder == TINY_MODEL:  # a base model: inference, serving and evaluation load it through here
        with pytest.raises(YakError, match=rf"broken/{name} cannot be read .*{fix}") as e:
            load_model_and_tokenizer(ModelSource(broken))
        assert "\n" not in str(e.value) and "tiktoken" not in str(e.value)
        train = argv(pt_dir, broken, tmp_path / "run")
    else:  # a tokenizer folder
        with pytest.raises(YakError, match=rf"broken/{name} cannot be read .*{fix}"):
            load_model_and_tokenizer(ModelSource(TINY_MODEL, tokenizer_path=broken))
        train = [*argv(pt_dir, TINY_MODEL, tmp_path / "run"), "--tokenizer_name_or_path", str(broken)]
    with pytest.raises(YakError, match=rf"broken/{name} cannot be read"):
        run_training(*parse_train_args(train))
    assert not (tmp_path / "run").exists()  # refused before the output folder was touched


def test_merge_names_a_cut_tokenizer_model(runs, tmp_path):
    from yak.merge import MergeArguments, merge

    broken = cut(runs / "tiny", tmp_path / "adapter", "tokenizer.model")
    with pytest.raises(YakError, match=r"adapter/tokenizer.model cannot be read") as e:
        merge(ModelSource(TINY_MODEL, [broken]), MergeArguments(output_dir=str(tmp_path / "m")))
    assert "tiktoken" not in str(e.value)


def test_serve_demo_names_a_cut_tokenizer_model(tmp_path):
    import socket

    broken = cut(TINY_MODEL, tmp_path / "base", "tokenizer.model")
    with socket.socket() as s:  # a free port (the server binds before it loads the model)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = subprocess.run([sys.executable, str(ROOT / "serve_demo.py"), "--base_model", str(broken), "--only_cpu",
                           "--port", str(port)], capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300,
                          check=False)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert f"{broken / 'tokenizer.model'} cannot be read" in done.stderr and "tiktoken" not in done.stderr


def test_bin_weights_load_as_plain_tensors_only(runs, tmp_path):
    """.bin weights (train.py --save_safetensors False) load weights-only; a planted one is refused."""
    from safetensors.torch import load_file

    from yak.merge import MergeArguments, merge

    base = tmp_path / "base"
    base.mkdir()
    model = LlamaForCausalLM.from_pretrained(TINY_MODEL)
    torch.save(model.state_dict(), base / "pytorch_model.bin")  # transformers 5 saves only safetensors
    for name in ("config.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copy(TINY_MODEL / name, base / name)
    adapter = tmp_path / "adapter"
    shutil.copytree(runs / "tiny", adapter)
    torch.save(load_file(adapter / "adapter_model.safetensors"), adapter / "adapter_model.bin")
    (adapter / "adapter_model.safetensors").unlink()
    loaded, _ = load_model_and_tokenizer(ModelSource(base, [adapter]), device="cpu")
    expected, _ = load_model_and_tokenizer(ModelSource(TINY_MODEL, [runs / "tiny"]), device="cpu")
    assert torch.equal(loaded.model.layers[0].self_attn.q_proj.weight, expected.model.layers[0].self_attn.q_proj.weight)
    merge(ModelSource(base, [adapter]), MergeArguments(output_dir=str(tmp_path / "merged")))
    marker = tmp_path / "MARKER"
    for planted in (adapter / "adapter_model.bin", base / "pytorch_model.bin"):  # the base is checked first
        plant(planted, marker)
        with pytest.raises(YakError, match=f"{planted.name} is refused: it imports posix.system"):
            load_model_and_tokenizer(ModelSource(base, [adapter]), device="cpu")
        with pytest.raises(YakError, match=f"{planted.name} is refused"):
            merge(ModelSource(base, [adapter]), MergeArguments(output_dir=str(tmp_path / "m2")))
    assert not marker.exists()


def test_one_tokenizer_rule(tmp_path):
    """An explicit tokenizer first, else the last adapter folder that has one, else the base's; a folder with
    only tokenizer_config.json has none (it cannot be loaded)."""
    a, b, c = (tmp_path / n for n in "abc")
    for d in (a, b, c):
        d.mkdir()
    (a / "tokenizer.model").write_bytes(b"")
    (b / "tokenizer.json").write_text("{}")
    (c / "tokenizer_config.json").write_text("{}")
    assert tokenizer_dir("base", [a, b, c]) == b
    assert tokenizer_dir("base", [a, c]) == a
    assert tokenizer_dir("base", [c]) == Path("base")
    assert tokenizer_dir("base", [a, b], tokenizer_path="tok") == Path("tok")
