"""The shared helpers: atomic outputs, content hashes, argument parsing, the chat template."""

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import ROOT
from yak import YakError
from yak.cli import parse_args
from yak.io import atomic_output_dir, content_hash
from yak.template import build_chat_template


def test_atomic_output_dir_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_output_dir(out) as tmp:
            (tmp / "half.txt").write_text("x")
            raise RuntimeError("boom")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_output_dir_refuses_existing_unless_overwrite(tmp_path):
    out = tmp_path / "out"
    with atomic_output_dir(out) as tmp:
        (tmp / "a.txt").write_text("1")
    with pytest.raises(YakError, match="already exists"):
        with atomic_output_dir(out):
            pass
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]


def test_content_hash_follows_content(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("one")
    h1 = content_hash([f], {"block_size": 8})
    assert h1 == content_hash([f], {"block_size": 8})
    assert h1 != content_hash([f], {"block_size": 16})
    f.write_text("two")
    assert h1 != content_hash([f], {"block_size": 8})


@dataclass
class _Args:
    lr: float = field(default=1.0, metadata={"help": "learning rate"})


def test_parse_args_refuses_unknown_keys(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text('{"lr": 2.0}')
    (args,) = parse_args([_Args], [str(cfg)])
    assert args.lr == 2.0
    cfg.write_text('{"lr": 2.0, "lr_typo": 3}')
    with pytest.raises(YakError, match="lr_typo"):
        parse_args([_Args], [str(cfg)])
    with pytest.raises(YakError, match="lr_typo"):
        parse_args([_Args], ["--lr_typo", "3"])


@dataclass
class _Required:
    model: str = field(metadata={"help": "a required folder"})
    stage: int = field(default=2, metadata={"help": "stage", "choices": [1, 2]})
    steps: int = field(default=1, metadata={"help": "steps"})


@pytest.mark.parametrize(
    "suffix, text, expected",
    [
        (".json", '{"stage": 1}', "model"),  # a required option left out
        (".json", '{"model": "m", "stage": 3}', "stage"),  # outside its choices
        (".yaml", "model: m\nsteps: ten\n", "steps"),  # not a number
        (".json", '{"model": "m", "stage": true}', "stage"),  # a bool is not an int
        (".yaml", "model: [unclosed\n", "c.yaml"),  # not YAML
        (".json", "[1, 2]", "c.json"),  # not a mapping
    ],
)
def test_parse_args_config_file_problems_are_yak_errors(tmp_path, suffix, text, expected):
    """A config file is held to what the command line checks: required options, choices, number types."""
    cfg = tmp_path / f"c{suffix}"
    cfg.write_text(text)
    with pytest.raises(YakError, match=expected):
        parse_args([_Required], [str(cfg)])
    cfg.write_text(
        '{"model": "m", "stage": 1, "steps": 3}' if suffix == ".json" else "model: m\nstage: 1\nsteps: '3'\n"
    )
    (args,) = parse_args([_Required], [str(cfg)])
    assert (args.model, args.stage, args.steps) == ("m", 1, 3)


@dataclass
class _Typed:
    overwrite: bool = field(default=False, metadata={"help": "delete the output"})
    modules: str = field(default="a,b", metadata={"help": "comma-separated modules"})
    folders: list[str] = field(default_factory=list, metadata={"help": "folders", "nargs": "+"})


@pytest.mark.parametrize(
    "text, expected",
    [
        ('{"overwrite": "false"}', (False, "a,b", [])),  # the string "false" is truthy: it was kept as is
        ('{"overwrite": "yes"}', (True, "a,b", [])),
        ('{"overwrite": 0}', (False, "a,b", [])),
        ('{"folders": "one"}', (False, "a,b", ["one"])),  # one folder, not its characters
        ('{"overwrite": "maybe"}', "must be true or false"),
        ('{"modules": ["a", "b"]}', "must be a string"),
        ('{"modules": null}', "'modules' has no value"),  # YAML's "modules:" (was None: a traceback later)
        ('{"overwrite": null}', "'overwrite' has no value"),
    ],
)
def test_parse_args_config_file_bools_strings_and_lists(tmp_path, text, expected):
    """Config values are read as the command line reads them, or refused."""
    cfg = tmp_path / "c.json"
    cfg.write_text(text)
    if isinstance(expected, str):
        with pytest.raises(YakError, match=expected):
            parse_args([_Typed], [str(cfg)])
    else:
        (args,) = parse_args([_Typed], [str(cfg)])
        assert (args.overwrite, args.modules, args.folders) == expected


def test_parse_args_config_file_keeps_training_arguments_lists_and_dicts(tmp_path):
    from transformers import TrainingArguments

    cfg = tmp_path / "c.yaml"
    cfg.write_text("output_dir: o\nreport_to: [none]\nlr_scheduler_kwargs: {min_lr: 0.1}\nbf16: 'false'\n")
    (args,) = parse_args([TrainingArguments], [str(cfg)])
    assert (args.report_to, args.lr_scheduler_kwargs, args.bf16) == ([], {"min_lr": 0.1}, False)


def test_parse_args_yaml_numbers_without_a_dot_are_numbers(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: 2e-4\n")  # PyYAML reads this as the string '2e-4'
    (args,) = parse_args([_Args], [str(cfg)])
    assert args.lr == 2e-4


def test_parse_args_yaml_numbers_without_a_dot_inside_a_dict(tmp_path):
    """As the command line's JSON reads them (was the string '1e-5': a TypeError in the scheduler)."""
    from transformers import TrainingArguments

    cfg = tmp_path / "c.yaml"
    cfg.write_text("output_dir: o\nlr_scheduler_kwargs: {min_lr: 1e-5, num_cycles: 2}\nrun_name: '1e3'\n")
    (args,) = parse_args([TrainingArguments], [str(cfg)])
    assert args.lr_scheduler_kwargs == {"min_lr": 1e-5, "num_cycles": 2} and args.run_name == "1e3"


def test_chat_template_renders_llama2_format(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = build_chat_template('Say "hi".')
    conv = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ]
    text = tok.apply_chat_template(conv, tokenize=False)
    assert text == '<s>[INST] <<SYS>>\nSay "hi".\n<</SYS>>\n\na [/INST] b </s><s>[INST] c [/INST]'
    with pytest.raises(Exception, match="alternate"):
        tok.apply_chat_template(conv[1:], tokenize=False)


def test_a_terminated_script_removes_what_it_was_writing(tmp_path):
    """kill (SIGTERM) mid-write: the temporary output folder is removed, as on Ctrl-C, not left behind."""
    script = tmp_path / "script.py"
    script.write_text(
        "import os, signal, time\n"
        "from yak.cli import run_main\n"
        "from yak.io import atomic_output_dir\n"
        "@run_main\n"
        "def main():\n"
        f"    with atomic_output_dir({str(tmp_path / 'out')!r}) as tmp:\n"
        "        (tmp / 'half').write_text('x')\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "        time.sleep(30)\n"
        "main()\n"
    )
    result = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=60,
                            check=False, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 128 + signal.SIGTERM, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["script.py"]


# A torchrun job like training's: each rank in a loop of gloo collectives, started through run_main.
RANKS_SCRIPT = """\
import os, sys, time
import torch
import torch.distributed as dist
from yak.cli import run_main

@run_main
def main():
    dist.init_process_group("gloo")
    print(f"rank {dist.get_rank()} pid {os.getpid()} ready", flush=True)
    t = torch.zeros(1)
    while True:
        dist.all_reduce(t)
        time.sleep(0.05)

main()
"""


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie that no one reaped does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in "ZX"
    except FileNotFoundError:
        return False


def _start_ranks(tmp_path) -> tuple[subprocess.Popen, dict[int, int], Path]:
    """torchrun with two ranks; returns it, {rank: pid} once both run, and its output file."""
    script, log = tmp_path / "ranks.py", tmp_path / "torchrun.log"
    script.write_text(RANKS_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                 "2", str(script)], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        pids = {int(m[0]): int(m[1]) for m in re.findall(r"rank (\d) pid (\d+) ready", log.read_text())}
        if len(pids) == 2:
            return proc, pids, log
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"the ranks did not start: {log.read_text()[-2000:]}")


def _wait_gone(pids, seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(map(_running, pids)):
        time.sleep(0.1)
    return [p for p in pids if _running(p)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_killing_the_launcher_stops_its_workers(tmp_path):
    """kill -9 of torchrun left its workers running, orphaned (issue 13, case 12): they die with it."""
    proc, pids, log = _start_ranks(tmp_path)
    try:
        proc.kill()
        proc.wait(timeout=10)
        assert _wait_gone(pids.values(), 10) == [], log.read_text()[-2000:]
    finally:
        for pid in pids.values():
            if _running(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_killing_one_rank_stops_the_whole_job_with_a_message(tmp_path):
    """kill -9 of one rank while the other waits for it in a collective: torchrun stops the other one and
    exits with an error that names the dead rank and its signal (issue 19)."""
    proc, pids, log = _start_ranks(tmp_path)
    try:
        os.kill(pids[1], signal.SIGKILL)
        assert proc.wait(timeout=60) != 0
        assert _wait_gone(pids.values(), 10) == []
        out = log.read_text()
        assert re.search(r"Root Cause.*rank\s*: 1 \(local_rank: 1\)\s+exitcode\s*: -9 .*Signal 9 \(SIGKILL\)", out,
                         re.DOTALL), out[-3000:]
    finally:
        proc.kill()
        for pid in pids.values():
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
