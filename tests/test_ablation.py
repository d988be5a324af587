"""bench/ablation.py at toy size: real training through train.py's code path, real held-out scoring."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from tests.conftest import HELDOUT, PT_DATA, ROOT, TINY_MODEL
from yak import YakError

SCRIPT = ROOT / "bench" / "ablation.py"
MERGED_TOKENIZER = ROOT / "tokenizer" / "stories260K_bo" / "merged_tokenizer_hf"


@pytest.fixture(scope="module")
def ablation():
    spec = importlib.util.spec_from_file_location("bench_ablation", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _args(ablation, out, **changes):
    options = {
        "output_dir": str(out), "model": str(TINY_MODEL), "tokenizer": str(MERGED_TOKENIZER),
        "corpus": str(PT_DATA), "arms": ["a", "d"], "seeds": [1, 2], "budget_bytes": 8000, "block_size": 32,
        "eval_points": 2, "eval_bytes": 1500,
        "heldout": [f"bo_modern={HELDOUT / 'bo_modern_nanhai_deseg_heldout.txt'}",
                    f"en={HELDOUT / 'en_moby_dick_heldout.txt'}"],
    }  # fmt: skip
    options.update(changes)
    return ablation.AblationArguments(**options)


def test_toy_ablation_trains_every_arm_on_the_same_bytes(ablation, tmp_path):
    out = tmp_path / "run"
    results = ablation.ablation(_args(ablation, out), [])

    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # written atomically, nothing left beside
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    assert (out / "ablation.png").read_bytes()[:4] == b"\x89PNG"
    runs = {(r["arm"], r["seed"]): r for r in results["runs"]}
    assert sorted(runs) == [("a", 1), ("a", 2), ("d", 1), ("d", 2)]
    # same training text for every arm: the budget split 3 : 4 in bytes (bo : en+zh)
    shares = {r["arm"]: r["bytes_per_source"] for r in runs.values()}
    assert shares["a"] == shares["d"]
    assert 0.98 * 8000 <= sum(shares["a"].values()) <= 8000
    assert abs(shares["a"]["bo"] / sum(shares["a"].values()) - 3 / 7) < 0.01
    # the byte-fallback tokenizer needs more tokens for the same bytes
    assert runs[("a", 1)]["tokens_per_byte"] > runs[("d", 1)]["tokens_per_byte"]
    for r in runs.values():
        # before training, then at 1/2 and all of the budget (d: stage 1 ends at 1/4, between them)
        assert [p["bytes"] for p in r["curve"]] == pytest.approx([0, r["bytes"] / 2, r["bytes"]])
        start, end = r["curve"][0]["bits_per_byte"], r["final"]
        assert end["bo_modern"] < start["bo_modern"]  # training on Tibetan helps held-out Tibetan
        assert r["tokens_per_second"] > 0 and r["wall_seconds"] > r["train_seconds"] > 0
    assert runs[("a", 1)]["final"] != runs[("a", 2)]["final"]  # the seed reaches the run
    assert (out / "runs" / "d_seed1" / "stage1" / "embeddings.safetensors").is_file()
    table = (out / "results.md").read_text()
    assert "| a: base tokenizer (byte fallback) |" in table and "| d: (c) + stage 1 |" in table
    assert " ± " in table  # two seeds: mean ± half the range


def test_effect_table_states_each_part_as_it_falls(ablation):
    def run(arm, bo):
        return {"arm": arm, "final": {"bo": bo}, "curve": [{"bits_per_byte": {"bo": 9.0}}], "tokens_per_byte": 1.0,
                "tokens_per_second": 1.0, "wall_seconds": 1.0}  # fmt: skip

    results = {
        "heldout": ["bo"], "budget_bytes": 1000, "arguments": {"seeds": [1, 2]},
        "runs": [run("a", 3.0), run("a", 3.2), run("b", 2.0), run("b", 2.2), run("c", 2.1), run("c", 2.3),
                 run("d", 2.6), run("d", 2.8)],
    }  # fmt: skip
    table = ablation.markdown(results)
    assert "| a: base tokenizer (byte fallback) | 3.100 ± 0.100 |" in table
    assert "| vocabulary extension | a → c | -0.900 (helps) |" in table
    assert "| mean-of-pieces init (vs random) | b → c | +0.100 (within spread) |" in table
    assert "| stage 1 (embeddings first) | c → d | +0.500 (hurts) |" in table
    assert "LoRA+" not in table  # arm e was not run


def test_bad_options_are_listed_together(ablation, tmp_path):
    args = _args(ablation, tmp_path, arms=["a", "z"], seeds=[1, 1], budget_bytes=0, stage1_share=1.0,
                 heldout=["bo=missing.txt"], mix="bo=3,xx=4")  # fmt: skip
    with pytest.raises(YakError) as e:
        ablation.check(args)
    for part in ("--arms a z", "--seeds", "--budget_bytes must be >= 1", "--stage1_share", "exists",
                 "--heldout bo=missing.txt", "no *.txt files in xx/"):  # fmt: skip
        assert part in str(e.value)


def _main(argv, monkeypatch):
    import runpy

    monkeypatch.setattr(sys, "argv", [str(SCRIPT), *argv])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    return e.value.code


def test_script_answers_help_and_refuses_bad_options(tmp_path, monkeypatch, capsys):
    assert _main(["--help"], monkeypatch) == 0 and "--budget_bytes" in capsys.readouterr().out
    out = tmp_path / "x"
    assert _main(["--arms", "q", "--output_dir", str(out), "--", "--max_steps", "1"], monkeypatch) == 2
    assert "--arms q: choose among a b c d e f" in capsys.readouterr().err
    assert not out.exists()
