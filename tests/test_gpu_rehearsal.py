"""bench/gpu_checks.sh rehearsed on the CPU: the GPU machine is scarce, so each job's code path must have run
before it gets there (issue 15). The default run takes the cheap jobs and the runner's own logic; the whole
rehearsal is ``slow`` (about 20 minutes on 2 shared cores)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

SCRIPT = ROOT / "bench" / "gpu_checks.sh"


def checks(tmp_path, jobs: str | None, timeout: int = 600, **env) -> tuple[subprocess.CompletedProcess, str]:
    """Run the rehearsal of ``jobs`` (None: all); its result and summary.txt."""
    logs = tmp_path / "logs"
    full_env = {**os.environ, "REHEARSAL": "1", "LOGS": str(logs), "WORK": str(tmp_path / "work"), **env}
    full_env.pop("OUT", None)
    if jobs is not None:
        full_env["JOBS"] = jobs
    result = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=full_env, timeout=timeout,
                            check=False)
    summary = (logs / "summary.txt").read_text() if (logs / "summary.txt").exists() else ""
    return result, summary


def test_rehearsal_of_preflight_and_serve_and_the_runner(tmp_path):
    """preflight imports what the jobs import; serve starts serve_demo.py; a job over its time limit is ended
    with its whole process tree (no server left behind) and reported; BUDGET skips what no longer fits."""
    result, summary = checks(tmp_path, "preflight +serve", T_serve="300")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "preflight  ok" in summary and "serve      ok" in summary, summary
    assert "preflight: RESULT preflight: 0 error(s)" in summary
    assert "serve: RESULT serve cpu tiny clients=16" in summary

    # over its limit: ended with its process tree and reported
    result, summary = checks(tmp_path / "cut", "serve", T_serve="3")
    assert result.returncode == 1
    assert "serve      TIMEOUT after 3 s" in summary and "SOME JOBS FAILED" in summary, summary
    assert not servers_of_this_checkout()  # the cut job's server was ended with it
    # a job that would get less than 30 s of what is left of BUDGET is skipped
    result, summary = checks(tmp_path / "budget", "decode", BUDGET="40")
    assert result.returncode == 0 and "decode     skipped (no time left in BUDGET=40)" in summary, summary


def servers_of_this_checkout() -> list[int]:
    found = subprocess.run(["pgrep", "-f", "serve_demo.py --base_model models/stories260K"], capture_output=True,
                           text=True, check=False).stdout.split()
    return [int(p) for p in found if os.path.realpath(f"/proc/{p}/cwd") == str(ROOT.resolve())]


def test_unknown_job_is_refused_before_any_runs(tmp_path):
    result, summary = checks(tmp_path, "preflight trian2")
    assert result.returncode == 2 and "unknown job 'trian2' in JOBS" in result.stderr and not summary


def test_bench_scripts_start_from_any_folder(tmp_path):
    """The first GPU run failed with "No module named 'yak'" in every bench script started as documented."""
    for script in ("loss_paths.py", "check_env.py"):
        result = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--help"], cwd=tmp_path,
                                capture_output=True, text=True, check=False, timeout=120)
        assert result.returncode == 0 and "usage:" in result.stdout, result.stderr


@pytest.mark.slow
def test_full_rehearsal(tmp_path):
    result, summary = checks(tmp_path, None, timeout=3600)
    assert result.returncode == 0, summary + result.stderr[-3000:]
    for job in ("preflight", "gputests", "runpt", "loss_paths", "serve", "13b", "train2", "train1", "decode"):
        assert f"{job:<10} ok" in summary, summary
    assert "RESULT runpt resume:" in summary and "RESULT loss_paths fast vs plain" in summary
