"""The output contract (issue 13, cases 1, 2, 6, 7, 8, 10, 14), each done for real: real tools on the shipped
tiny model, real second processes, real ``kill -9``, a real full filesystem (a small tmpfs)."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from tests.conftest import PT_DATA, ROOT, TINY_MODEL
from yak import YakError
from yak.outdir import MANIFEST, foreign_files, output_dir_problems, replace_dir, write_error
from yak.source import ModelSource
from yak.training import parse_train_args, run_training

MERGED_TOKENIZER = ROOT / "tokenizer" / "stories260K_bo" / "merged_tokenizer_hf"
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def plant(folder: Path) -> None:
    """A user's own files in an output folder: the tools must never delete them."""
    (folder / "notes.txt").write_text("my notes")
    (folder / "sub").mkdir()
    (folder / "sub" / "keep.bin").write_bytes(b"\x00\x01")


def planted(folder: Path) -> bool:
    return (folder / "notes.txt").read_text() == "my notes" and (folder / "sub" / "keep.bin").read_bytes() == b"\x00\x01"


def wait_for(condition, what: str, seconds: float = 180, proc=None) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert proc is None or proc.poll() is None, f"exited before {what}: {proc.communicate()[1][-3000:]}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


# ------------------------------------------------------------------------------------------ the contract


def test_replace_dir_records_its_files_and_deletes_only_those(tmp_path):
    out = tmp_path / "out"
    # a failure leaves nothing: no output, no temporary folder, no lock
    with pytest.raises(RuntimeError), replace_dir(out) as tmp:
        (tmp / "half.txt").write_text("x")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with replace_dir(out) as tmp:
        (tmp / "a.txt").write_text("1")
        (tmp / "deep").mkdir()
        (tmp / "deep" / "b.txt").write_text("2")
    assert json.loads((out / MANIFEST).read_text())["files"] == ["a.txt", "deep/b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(YakError, match="already exists; choose another folder, or pass --overwrite"), replace_dir(out):
        pass
    plant(out)
    assert foreign_files(out) == ["notes.txt", "sub/keep.bin"]
    with pytest.raises(YakError, match="holds files that Yak did not write: notes.txt, sub/keep.bin"), \
            replace_dir(out, overwrite=True):
        pass
    assert planted(out) and (out / "deep" / "b.txt").is_file()
    shutil.rmtree(out / "sub")
    (out / "notes.txt").unlink()
    with replace_dir(out, overwrite=True) as tmp:
        (tmp / "c.txt").write_text("3")
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "c.txt"]
    empty = tmp_path / "empty"  # an empty folder holds nothing to lose
    empty.mkdir()
    assert output_dir_problems(empty, overwrite=False) == []


def test_write_errors_name_the_folder_and_reader_errors_pass_through(tmp_path):
    """Only a failed write becomes the one-line error: an input that cannot be read is its loader's to report."""
    full = write_error(tmp_path / "out", OSError(errno.ENOSPC, "No space left on device"))
    assert str(full).startswith(f"cannot write {tmp_path / 'out'}: No space left on device (")
    denied = PermissionError(errno.EACCES, "Permission denied", str(tmp_path / ".out.tmp-7" / "a.bin"))
    assert "make" in str(write_error(tmp_path / "out", denied, tmp_path / ".out.tmp-7"))
    assert write_error(tmp_path / "out", PermissionError(errno.EACCES, "Permission denied", "/srv/in.bin")) is None
    assert write_error(tmp_path, RuntimeError("PytorchStreamReader failed reading zip archive")) is None
    assert write_error(tmp_path, RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576"))


def test_a_terminated_script_removes_what_it_was_writing_and_its_lock(tmp_path):
    """kill (SIGTERM) mid-write: the temporary output folder and the lock are removed, as on Ctrl-C."""
    script = tmp_path / "script.py"
    script.write_text(
        "import os, signal, time\n"
        "from yak.cli import run_main\n"
        "from yak.outdir import replace_dir\n"
        "@run_main\n"
        "def main():\n"
        f"    with replace_dir({str(tmp_path / 'out')!r}) as tmp:\n"
        "        (tmp / 'half').write_text('x')\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "        time.sleep(30)\n"
        "main()\n"
    )
    result = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=60,
                            check=False, env=ENV)
    assert result.returncode == 128 + signal.SIGTERM, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["script.py"]


# ------------------------------------------------------------------------------ case 1: merge, evaluate


@pytest.fixture(scope="module")
def base_and_lora(tmp_path_factory):
    """A Llama of 7M parameters (random weights; large enough that a merge writes for about a second) and a
    LoRA adapter for it, with the tiny model's tokenizer."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("merge")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=8000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=4, max_position_embeddings=256)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(root / "base")
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(TINY_MODEL / name, root / "base" / name)
    get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])).save_pretrained(
        root / "lora")
    return root / "base", root / "lora"


def test_merge_overwrite_deletes_only_what_the_merge_wrote(base_and_lora, tmp_path):
    """Was: --overwrite deleted notes.txt and sub/keep.bin, exit 0."""
    from yak.merge import MergeArguments, merge

    out = tmp_path / "merged"
    source = ModelSource(str(base_and_lora[0]), [str(base_and_lora[1])])
    args = MergeArguments(output_dir=str(out))
    merge(source, args)
    written = sorted(p.name for p in out.iterdir())
    plant(out)
    args.overwrite = True
    with pytest.raises(YakError, match="holds files that Yak did not write: notes.txt, sub/keep.bin"):
        merge(source, args)  # checked with the other inputs, before the merge starts
    assert planted(out) and sorted(p.name for p in out.iterdir()) == sorted([*written, "notes.txt", "sub"])
    shutil.move(out / "notes.txt", tmp_path / "notes.txt")
    shutil.move(out / "sub", tmp_path / "sub")
    merge(source, args)  # only its own files there: replaced
    assert sorted(p.name for p in out.iterdir()) == written and not foreign_files(out)


def test_evaluate_overwrite_deletes_only_what_evaluate_wrote(tmp_path):
    from yak.evaluation import EvalArguments, evaluate

    out = tmp_path / "eval"
    args = EvalArguments(models=[str(TINY_MODEL)], tasks=["tusa"], limit=2, max_length=160,
                         data_root=str(ROOT / "tests" / "data" / "eval"), output_dir=str(out))
    evaluate(args)
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    plant(out)
    (out / "predictions" / "mine.jsonl").write_text("{}\n")  # inside a folder the tool wrote
    args.overwrite = True
    with pytest.raises(YakError) as e:
        evaluate(args)
    assert "holds files that Yak did not write: notes.txt, predictions/mine.jsonl, sub/keep.bin" in str(e.value)
    assert planted(out) and (out / "predictions" / "mine.jsonl").is_file()
    for name in ("notes.txt", "sub", "predictions/mine.jsonl"):
        shutil.move(out / name, tmp_path / Path(name).name)
    evaluate(args)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == written


# ------------------------------------------------------------------------------------- training: 2, 6, 8


@pytest.fixture(scope="module")
def pt_dir(tmp_path_factory):
    """A small dataset_dir of real lines: bo (Milarepa), en (Austen)."""
    root = tmp_path_factory.mktemp("pt")
    for src, n in (("bo/mila.txt", 10), ("en/austen_pride_and_prejudice.txt", 200)):
        (root / src).parent.mkdir(parents=True, exist_ok=True)
        lines = (PT_DATA / src).read_text(encoding="utf-8").splitlines(keepends=True)[:n]
        (root / src).write_text("".join(lines), encoding="utf-8")
    return root


def train_argv(pt_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["--model_name_or_path", str(TINY_MODEL), "--tokenizer_name_or_path", str(MERGED_TOKENIZER),
            "--dataset_dir", str(pt_dir), "--data_cache_dir", str(pt_dir.parent / "cache"), "--block_size", "64",
            "--per_device_train_batch_size", "2", "--output_dir", str(out), "--use_cpu", "--report_to", "none",
            "--dataloader_num_workers", "0", "--plot_loss", "false", "--stage", "1", "--mix", "none", *extra]


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


def test_bad_option_or_foreign_file_deletes_nothing_of_a_finished_run(pt_dir, tmp_path):
    """Case 2. Was: --overwrite_output_dir --validation_split_percentage 150 deleted the finished run first."""
    out = tmp_path / "run"
    run_training(*parse_train_args(train_argv(pt_dir, out, "--max_steps", "1")))
    before = snapshot(out)
    with pytest.raises(YakError, match="--validation_split_percentage 150.0: must be a percentage"):
        run_training(*parse_train_args(train_argv(pt_dir, out, "--max_steps", "2", "--overwrite_output_dir",
                                                  "--validation_split_percentage", "150")))
    assert snapshot(out) == before
    plant(out)
    with pytest.raises(YakError, match="holds a finished run, and holds files that Yak did not write: notes.txt, "
                                       "sub/keep.bin; --overwrite_output_dir deletes only what Yak wrote"):
        run_training(*parse_train_args(train_argv(pt_dir, out, "--max_steps", "1", "--overwrite_output_dir")))
    assert {k: v for k, v in snapshot(out).items() if k not in ("notes.txt", "sub", "sub/keep.bin")} == before
    assert planted(out)


class _Hold(TrainerCallback):
    """Holds the run once its first checkpoint is saved (its output folder locked) until ``release`` is set."""

    def __init__(self):
        self.holding, self.release = threading.Event(), threading.Event()

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == 1:
            self.holding.set()
            assert self.release.wait(300)


def test_second_train_process_is_refused_and_a_dead_lock_is_taken_over(pt_dir, tmp_path, caplog):
    """Case 6. Was: the second run resumed the first one's checkpoint while the first was still training."""
    out, hold = tmp_path / "run", _Hold()
    argv = train_argv(pt_dir, out, "--max_steps", "2", "--save_steps", "1")
    first = threading.Thread(target=lambda: run_training(*parse_train_args(argv), callbacks=[hold]))
    first.start()
    try:
        assert hold.holding.wait(300), "the first run did not start"
        assert (out / "checkpoint-1" / "yak_checkpoint.json").is_file()  # what the second one used to resume
        second = subprocess.run([sys.executable, "train.py", *argv], cwd=ROOT, env=ENV, capture_output=True,
                                text=True, timeout=300, check=False)
    finally:
        hold.release.set()
        first.join()
    assert second.returncode == 2, second.stderr[-3000:]
    lock = tmp_path / ".run.lock"
    assert f"{out} is being written by process {os.getpid()} (lock {lock})" in second.stderr
    assert (out / "yak_adapter.json").is_file() and not lock.exists()  # the first run finished undisturbed
    # a process that dies holding a lock (kill -9) leaves its lock file, which nobody holds any more
    other = tmp_path / "other"
    script = f"import os, signal; from yak.outdir import Lock; Lock({str(other)!r}).acquire(); os.kill(os.getpid(), signal.SIGKILL)"
    dead = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=ENV, timeout=60, check=False)
    assert dead.returncode == -signal.SIGKILL
    stale = tmp_path / ".other.lock"
    pid = stale.read_text().strip()
    with caplog.at_level(logging.WARNING, logger="yak.outdir"):
        run_training(*parse_train_args(train_argv(pt_dir, other, "--max_steps", "1")))
    assert f"taking over the lock {stale} of process {pid}, which ended without releasing it" in caplog.text
    assert (other / "yak_adapter.json").is_file() and not stale.exists()


class _Interrupt(TrainerCallback):
    """A Ctrl-C at the end of step 1, before any checkpoint."""

    def on_step_end(self, args, state, control, **kwargs):
        raise KeyboardInterrupt("simulated Ctrl-C")


def test_a_run_that_fails_before_its_first_checkpoint_leaves_nothing(pt_dir, tmp_path):
    """Case 8. Was: yak_run.json stayed, as if a run were there."""
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_training(*parse_train_args(train_argv(pt_dir, out, "--max_steps", "5", "--save_steps", "3")),
                     callbacks=[_Interrupt()])
    assert list(tmp_path.iterdir()) == []  # no run file, no manifest, no folder, no lock


# ------------------------------------------------------------------------------- case 7: predictions file


def test_predictions_file_is_not_replaced_without_overwrite(tmp_path):
    from yak.generation.arguments import GenerationArguments, InferenceArguments
    from yak.generation.inference import run_inference

    inputs = tmp_path / "in.txt"
    inputs.write_text("Once upon a time\n")
    predictions = tmp_path / "predictions.json"
    predictions.write_text("my earlier predictions")
    args = (ModelSource(base_model=str(TINY_MODEL)), GenerationArguments(max_new_tokens=4),
            InferenceArguments(data_file=str(inputs), predictions_file=str(predictions)))
    with pytest.raises(YakError, match=f"--predictions_file {predictions} already exists; choose another file "
                                       "name, or pass --overwrite"):
        run_inference(*args)
    assert predictions.read_text() == "my earlier predictions"
    args[2].overwrite = True
    run_inference(*args)
    assert json.loads(predictions.read_text())[0]["input"] == "Once upon a time"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "predictions.json"]


# ------------------------------------------------------------------------------ case 10: kill -9 of a merge


def test_leftovers_of_a_killed_merge_are_removed_by_the_next_run(base_and_lora, tmp_path, caplog):
    """Was: kill -9 during a merge left .NAME.tmp-PID (13 GB at 7B) that later runs never removed."""
    from yak.merge import MergeArguments, merge

    out = tmp_path / "merged"
    cmd = [sys.executable, "merge_lora_low_mem.py", "--base_model", str(base_and_lora[0]), "--lora_model",
           str(base_and_lora[1]), "--output_dir", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    leftover = tmp_path / f".merged.tmp-{proc.pid}"
    try:
        wait_for(lambda: (leftover / "config.json").exists() or (leftover / "model.safetensors").exists(),
                 "the merge to write", proc=proc)
    finally:
        proc.kill()
        proc.wait()
    assert leftover.is_dir() and not out.exists()
    with caplog.at_level(logging.WARNING, logger="yak.outdir"):
        merge(ModelSource(str(base_and_lora[0]), [str(base_and_lora[1])]), MergeArguments(output_dir=str(out)))
    assert f"removing {leftover}, left by process {proc.pid}" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no leftover, no lock


# --------------------------------------------------------------------- case 14: a full disk in a checkpoint


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB filesystem (tmpfs), too small for the first checkpoint of the tiny stage-1 run (about 3 MB).

    Mounting needs root; elsewhere the same failure is made with RLIMIT_FSIZE (writes past 1.5 MB fail with
    EFBIG, as at a quota) and the test says so in its name's parameters.
    """
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True,
                             check=False).returncode == 0

    @contextlib.contextmanager
    def full():
        if mounted:
            yield "tmpfs"
            return
        old_limit, old_handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ,
                                                                                            signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1_500_000, old_limit[1]))
        try:
            yield "RLIMIT_FSIZE"
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
            signal.signal(signal.SIGXFSZ, old_handler)

    yield disk, full
    if mounted:
        # lazily: the failed run's file objects (kept by the traceback until collected) may still be open there
        subprocess.run(["umount", "--lazy", str(disk)], check=False)


def test_full_disk_during_a_checkpoint_is_one_line_and_leaves_no_partial_checkpoint(pt_dir, small_disk):
    """Was: "iostream error", and the partial checkpoint stayed."""
    disk, full = small_disk
    out = disk / "run"
    with full() as how, pytest.raises(YakError) as e:
        run_training(*parse_train_args(train_argv(pt_dir, out, "--max_steps", "2", "--save_steps", "1")))
    message = str(e.value)
    assert message.startswith(f"cannot write {out / 'checkpoint-1'}: ") and "\n" not in message
    if how == "tmpfs":
        assert "No space left on device" in message and "MiB free on" in message
    assert list(disk.iterdir()) == []  # no partial checkpoint; the run stopped before its first one: nothing
