"""The newcomer's main job: run_demo.sh runs every stage on the shipped tiny model and sample data."""

import importlib.util
import json
import os
import signal
import subprocess
import time

from tests.conftest import ROOT


def test_run_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    # the public benchmark sets are left out (EVAL_DATA names no folder): test_evaluation runs those tasks, and
    # they cost the suite about 20 s here; held-out text and the tokenizer section are still evaluated
    env = {**os.environ, "OUT": str(out), "EVAL_DATA": str(tmp_path / "no_eval_data")}
    proc = subprocess.run(["bash", "run_demo.sh"], check=False, cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for path in ["tokenizer/merged_tokenizer_hf/tokenizer.json", "pt/stage1/embeddings.safetensors",
                 "pt/stage2/adapter_model.safetensors", "pt/stage2/loss.png", "sft/adapter_model.safetensors",
                 "merged/config.json", "eval/results.md", "eval/results.png"]:
        assert (out / path).is_file(), path
    # the merged model carries the complete tokenizer: SentencePiece file (llama.cpp), template in the config
    assert (out / "merged/tokenizer.model").is_file()
    assert "[INST]" in json.loads((out / "merged/tokenizer_config.json").read_text())["chat_template"]
    if importlib.util.find_spec("llama_cpp"):  # the GGUF step ran, and its tokenization check passed
        names = sorted(p.name for p in (out / "gguf").glob("*.gguf"))
        assert len(names) == 2 and names[0].endswith("f16.gguf") and names[1].endswith("q4_0.gguf")
    config = json.loads((out / "merged/config.json").read_text())
    assert config["vocab_size"] == 512 + 3000 + 8  # 3,512 tokens padded to a multiple of 64
    results = json.loads((out / "eval/results.json").read_text())["results"]
    key = "bo_modern_nanhai_deseg_heldout/bits_per_byte"
    # the trained model models held-out Tibetan far better than the base (34.5 bits per byte, byte fallback)
    assert results["yak"]["heldout"][key] < 0.5 * results["base"]["heldout"][key]
    answer = json.loads((out / "chat.json").read_text(encoding="utf-8"))
    # the original format; the tiny model's answer may be empty (it can end its answer at once)
    assert set(answer) == {"query", "output"} and answer["query"].endswith("།")
    assert isinstance(answer["output"], str) and "[INST]" not in answer["output"]
    assert "Done in" in proc.stdout
    # a second run refuses to overwrite the first
    again = subprocess.run(["bash", "run_demo.sh"], check=False, cwd=ROOT, env=env, capture_output=True,
                           text=True)
    assert again.returncode == 2 and "already exists" in again.stderr


def test_interrupted_demo_leaves_no_output_and_keeps_a_complete_one(tmp_path):
    """Ctrl-C during a step: no $OUT (the run wrote to a hidden folder beside it, now removed); an existing $OUT
    is refused, untouched."""
    out = tmp_path / "demo"
    proc = subprocess.Popen(["bash", "run_demo.sh"], cwd=ROOT, env={**os.environ, "OUT": str(out)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 60
    while not list(tmp_path.rglob("*tokenizer*")) and time.time() < deadline:
        time.sleep(0.1)  # step 1 is writing its output
    assert proc.poll() is None, proc.communicate()
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C sends: the whole foreground process group
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted: nothing was written" in err, err[-2000:]
    assert list(tmp_path.iterdir()) == []
    out.mkdir()
    (out / "results.md").write_text("an earlier complete run")
    again = subprocess.run(["bash", "run_demo.sh"], check=False, cwd=ROOT, env={**os.environ, "OUT": str(out)},
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "already exists" in again.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]
    assert (out / "results.md").read_text() == "an earlier complete run"


def test_shell_scripts_answer_help_without_running(tmp_path):
    """--help prints the script's description; it must not start the pipeline (which writes outputs)."""
    env = {**os.environ, "OUT": str(tmp_path / "demo"), "output_dir": str(tmp_path / "merged")}
    for script, words in [("run_demo.sh", "whole pipeline"), ("run_merge_export.sh", "Merge the trained parts"),
                          ("run_pt.sh", "Continued pretraining in two stages"),
                          ("run_sft.sh", "Instruction tuning")]:
        for flag in ("--help", "-h"):
            proc = subprocess.run(["bash", script, flag], check=False, cwd=ROOT, env=env, capture_output=True,
                                  text=True, timeout=60)
            assert proc.returncode == 0 and words in proc.stdout, (script, proc.stdout[-500:], proc.stderr[-500:])
    assert list(tmp_path.iterdir()) == []
