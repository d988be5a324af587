"""The four commands the original project's users type first, run verbatim (paths and sizes made tiny):
``sh run_pt.sh``, ``sh run_merge_export.sh``, ``python serve_demo.py`` then ``POST /api/chat``, and
``python inference_hf.py --interactive``, with the original flags (issue 14). ``sh`` is dash here, as on
Debian and Ubuntu; the wrappers run under bash too."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.conftest import ROOT
from yak import YakError
from yak.defaults import MERGED_OUTPUTS, TINY_MODEL, default_model

DASH = shutil.which("dash")
# the CPU defaults of run_pt.sh, shortened: 4 steps a stage
TINY_PT = {"STAGE1_TOKENS": "2048", "STAGE2_TOKENS": "2048", "WARMUP_STEPS": "1", "SAVE_STEPS": "1000"}


def _run(cmd: list[str], env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=600, check=False, **kwargs)


@pytest.fixture(scope="module")
def pt_run(tmp_path_factory):
    """``sh run_pt.sh`` under dash, once for the module: stage 1 then stage 2 of the tiny model, with the
    original ``--save_safetensors False`` (PyTorch .bin weights)."""
    if DASH is None:
        pytest.fail("dash is not installed (apt-get install dash): the wrappers must run under Debian's sh")
    work = tmp_path_factory.mktemp("pt")
    env = {**TINY_PT, "OUT": str(work / "pt"), "CACHE": str(work / "cache")}
    done = _run([DASH, "run_pt.sh", "--plot_loss", "false", "--save_safetensors", "False"], env)
    return work, env, done


def test_run_pt_sh_under_dash_trains_both_stages(pt_run):
    work, _, done = pt_run
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Illegal option" not in done.stderr
    assert "done: stage 1 in" in done.stdout
    stage1, stage2 = work / "pt" / "stage1", work / "pt" / "stage2"
    # --save_safetensors False: the original's PyTorch weights (torch.save of a state dict), no safetensors
    assert (stage1 / "embeddings.bin").is_file() and not list(stage1.glob("*.safetensors"))
    assert (stage2 / "adapter_model.bin").is_file() and not list(stage2.glob("*.safetensors"))
    assert json.loads((stage2 / "yak_run.json").read_text())["identity"]["adapters"] == [str(stage1)]


def test_run_pt_sh_again_under_bash_skips_finished_stages_and_resumes_an_unfinished_one(pt_run):
    work, env, first = pt_run
    assert first.returncode == 0, first.stderr[-3000:]
    done = _run(["bash", "run_pt.sh"], env)
    assert done.returncode == 0 and "already finished" in done.stdout and "nothing to do" in done.stdout, done
    # stage 2 stopped after its checkpoint (no final descriptor yet): stage 1 is skipped, stage 2 resumes
    (work / "pt" / "stage2" / "adapter_config.json").unlink()
    done = _run([DASH, "run_pt.sh", "--plot_loss", "false", "--save_safetensors", "False"], env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "stage 1 already finished" in done.stdout and "resuming from" in done.stderr
    assert (work / "pt" / "stage2" / "adapter_config.json").is_file()


def test_run_merge_export_sh_without_llama_cpp_exports_hf_and_pth_and_says_how_to_add_gguf(pt_run, tmp_path):
    work, _, _ = pt_run
    env = {"base_model": str(ROOT / TINY_MODEL), "lora_model": f"{work}/pt/stage1,{work}/pt/stage2",
           "output_dir": str(tmp_path / "hf"), "pth_dir": str(tmp_path / "pth"), "gguf_dir": str(tmp_path / "gguf"),
           "output_dtype": "float32", "YAK_CACHE_DIR": str(tmp_path / "cache"), "verbose": "1"}
    # GGUF=1 where it is not possible: a clear error before anything is written
    done = _run([DASH, "run_merge_export.sh"], {**env, "GGUF": "1"})
    assert done.returncode == 2 and "GGUF=1, but GGUF export is not possible" in done.stderr, done.stderr
    assert "pip install -r requirements-gguf.txt" in done.stderr and "Traceback" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    done = _run([DASH, "run_merge_export.sh"], env)  # GGUF=auto, the default
    assert done.returncode == 0, done.stderr[-3000:]
    hint = [line for line in done.stdout.splitlines() if "GGUF" in line]
    assert len(hint) == 1 and hint[0].startswith("GGUF skipped") and "requirements-gguf.txt" in hint[0], hint
    assert (tmp_path / "hf" / "model.safetensors").is_file() and (tmp_path / "pth" / "consolidated.00.pth").is_file()
    assert not (tmp_path / "gguf").exists()
    assert re.search(r"DEBUG yak\.merge: model\.embed_tokens\.weight \(3520, 64\) float32", done.stderr)  # verbose=1


def test_merge_script_takes_the_original_command_line_with_verbose(pt_run, tmp_path):
    work, _, _ = pt_run
    done = _run([sys.executable, "merge_lora_low_mem.py", "--base_model", str(ROOT / TINY_MODEL), "--lora_model",
                 f"{work}/pt/stage1,{work}/pt/stage2", "--output_type", "huggingface", "--output_dir",
                 str(tmp_path / "merged"), "--verbose"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "DEBUG yak.merge: model.layers.0.self_attn.q_proj.weight" in done.stderr
    assert (tmp_path / "merged" / "config.json").is_file()


def test_serve_demo_without_a_model_serves_the_default_and_answers_api_chat_with_cors(tmp_path):
    """``python serve_demo.py`` as typed (plus a free port): the default model, its URL, a real POST
    /api/chat with a field the server does not know, and a real CORS preflight for --cors_origin."""
    model, why = default_model()
    proc = subprocess.Popen([sys.executable, "serve_demo.py", "--port", "0", "--cors_origin", "http://example.org",
                             "--max_new_tokens", "8", "--temperature", "0"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        seen = []
        deadline = time.time() + 180
        while time.time() < deadline and not any("serving" in line for line in seen):
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "".join(seen)
            seen.append(line)
        log = "".join(seen)
        assert f"using {model.relative_to(ROOT)} ({why})" in log, log
        url = re.search(r"serving \S+ on (http://127\.0\.0\.1:(\d+)/)", log)
        assert url and url[2] != "0", log
        url = url[1]
        req = urllib.request.Request(url + "api/chat", data=json.dumps(
            {"query": "Once upon a time", "user": "someone", "session": 7}).encode(),
            headers={"Content-Type": "application/json", "Origin": "http://example.org"})
        with urllib.request.urlopen(req, timeout=120) as r:
            assert r.headers["Access-Control-Allow-Origin"] == "http://example.org"
            answer = json.load(r)
        assert answer["query"] == "Once upon a time" and answer["output"].strip()
        for origin, allowed in (("http://example.org", True), ("http://elsewhere.org", False)):
            req = urllib.request.Request(url + "api/chat", method="OPTIONS", headers={
                "Origin": origin, "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type"})
            with urllib.request.urlopen(req, timeout=30) as r:
                assert (r.headers.get("Access-Control-Allow-Origin") == origin) is allowed, (origin, r.headers)
                if allowed:
                    assert "POST" in r.headers["Access-Control-Allow-Methods"]
                    assert "content-type" in r.headers["Access-Control-Allow-Headers"].lower()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_bad_cors_origin_is_refused_before_the_model_loads():
    done = _run([sys.executable, "serve_demo.py", "--port", "0", "--cors_origin", "example.org/page"])
    assert done.returncode == 2 and "--cors_origin 'example.org/page'" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("command", [
    ["inference_hf.py", "--interactive", "--use_flash_attention_2"],
    ["inference_hf.py", "--base_model", str(TINY_MODEL), "--with_prompt", "--interactive"],
], ids=["default-model", "original"])
def test_inference_hf_interactive_as_typed(command):
    done = _run([sys.executable, *command, "--max_new_tokens", "12", "--temperature", "0"],
                input="Once upon a time\n/quit\n")
    assert done.returncode == 0, done.stderr[-3000:]
    answers = [line for line in done.stdout.splitlines() if line.startswith("user> assistant> ")]
    assert len(answers) == 1 and len(answers[0]) > len("user> assistant> ") + 3, done.stdout
    if "--base_model" not in command:
        model, why = default_model()
        assert f"using {model.relative_to(ROOT)} ({why})" in done.stderr
        # no CUDA here: the original flag is accepted and the fallback is named
        assert "--use_flash_attention_2: it needs a CUDA GPU; using PyTorch's sdpa attention" in done.stderr


def test_default_model_is_the_newest_merged_output_else_the_tiny_model(tmp_path):
    shutil.copytree(ROOT / TINY_MODEL, tmp_path / TINY_MODEL)
    assert default_model(tmp_path) == (tmp_path / TINY_MODEL, default_model(tmp_path)[1])
    assert "shipped tiny model" in default_model(tmp_path)[1]
    for i, folder in enumerate(MERGED_OUTPUTS):
        (tmp_path / folder).mkdir(parents=True)
        if i == 0:  # a merge that was killed leaves no yak_merge.json: not a merged model
            assert default_model(tmp_path)[0] == tmp_path / TINY_MODEL
        (tmp_path / folder / "yak_merge.json").write_text("{}")
        os.utime(tmp_path / folder / "yak_merge.json", (1000 + i, 1000 + i))
    newest = (tmp_path / MERGED_OUTPUTS[-1], "the newest merged output of the shipped pipeline")
    assert default_model(tmp_path) == newest
    os.utime(tmp_path / MERGED_OUTPUTS[0] / "yak_merge.json", (5000, 5000))
    assert default_model(tmp_path)[0] == tmp_path / MERGED_OUTPUTS[0]


def test_wrappers_need_no_bare_python(tmp_path):
    """Where only ``python3`` exists (Debian, Ubuntu): the wrappers find it; none calls bare ``python``."""
    (tmp_path / "python3").symlink_to(sys.executable)
    for tool in ("dirname", "awk", "date", "mkdir"):
        if shutil.which(tool):
            (tmp_path / tool).symlink_to(shutil.which(tool))
    for script in ("run_pt.sh", "run_sft.sh", "run_merge_export.sh", "run_demo.sh"):
        text = (ROOT / script).read_text()
        assert not re.search(r"^\s*python\s", text, re.MULTILINE) and "bash" not in text.splitlines()[0], script
        done = _run([DASH or "sh", script, "--help"], {"PATH": str(tmp_path)})
        assert done.returncode == 0 and len(done.stdout.splitlines()) > 3, (script, done.stderr)


def test_export_gguf_never_downloads(tmp_path):
    """Without llama.cpp's converter, export_gguf.py says how to fetch the pinned sources, and neither starts pip
    (or any Python) nor opens a network connection: an audit hook stops it at the first attempt."""
    from yak.gguf import LLAMA_CPP_PYTHON_VERSION

    pins = [line for line in (ROOT / "requirements-gguf.txt").read_text().splitlines() if line and line[0] != "#"]
    assert pins == [f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"]
    hook = (
        "import runpy, sys\n"
        "def hook(event, args):\n"
        "    python = event == 'subprocess.Popen' and ('pip' in str(args[1]) or 'python' in str(args[0]))\n"
        "    if python or event in ('socket.connect', 'socket.getaddrinfo', 'urllib.Request'):\n"
        "        raise SystemExit(f'not allowed: {event} {args}')\n"
        "sys.addaudithook(hook)\n"
        "sys.argv = ['export_gguf.py'] + sys.argv[1:]\n"
        "runpy.run_path('export_gguf.py', run_name='__main__')\n"
    )
    done = _run([sys.executable, "-c", hook, "--model_dir", str(TINY_MODEL), "--output_dir", str(tmp_path / "gguf"),
                 "--quant_types", ""], {"YAK_CACHE_DIR": str(tmp_path / "cache")})
    assert done.returncode == 2 and "not allowed" not in done.stderr, done.stderr
    assert f"pip download --no-deps --no-binary :all: -d {tmp_path / 'cache'} llama-cpp-python==" in done.stderr
    assert not (tmp_path / "gguf").exists() and not (tmp_path / "cache").exists()


def test_pipeline_launches_torchrun_for_several_processes_or_deepspeed():
    from yak.pipeline import ROOT as PIPELINE_ROOT
    from yak.pipeline import Variables, launcher, overwrite_requested

    def v(**env):
        return Variables({"GPUS": "1", "NODES": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "", "NODE_RANK": "0",
                          **env}, "run_pt.sh")

    train = str(PIPELINE_ROOT / "train.py")
    assert launcher(v(), uses_deepspeed=False) == [sys.executable, train]
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    assert launcher(v(GPUS="8"), False) == [*torchrun, "--standalone", "--nproc_per_node", "8", train]
    assert launcher(v(), True) == [*torchrun, "--standalone", "--nproc_per_node", "1", train]
    assert launcher(v(NODES="2", NODE_RANK="1"), False) == [
        *torchrun, "--nnodes", "2", "--node_rank", "1", "--nproc_per_node", "1", "--master_addr", "10.0.0.1",
        "--master_port", "29500", train]
    with pytest.raises(YakError, match="GPUS='two': give a number"):
        launcher(v(GPUS="two"), False)
    with pytest.raises(YakError, match="the variable NODES is not set; run the pipeline through run_pt.sh"):
        launcher(Variables({"GPUS": "1"}, "run_pt.sh"), False)
    # --overwrite_output_dir as train.py reads it, not as text: "false" and other options' values do not count
    assert overwrite_requested(["--overwrite_output_dir"]) and overwrite_requested(["--overwrite_output_dir", "true"])
    assert not overwrite_requested(["--overwrite_output_dir=false", "--logging_steps", "2"])
    assert not overwrite_requested(["--run_name", "--overwrite_output_dir-test"])
