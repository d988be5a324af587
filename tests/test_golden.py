"""Golden losses: fixed-seed tiny runs of stage 1, stage 2 (on top of stage 1) and SFT (on top of both),
through train.py's own code path (``parse_train_args`` then ``run_training``), whose first 20 losses are
pinned to values recorded on the code before the issue-17 refactor.

A change that alters training semantics (data order, masking, which weights train, learning rates, schedule,
initialisation of the new embeddings) moves these numbers; a pure refactor must not.

Tolerance: rel 1e-4. On the CPU in fp32 with one thread (tests/conftest.py sets OMP_NUM_THREADS=1) runs of
the same code gave bit-identical losses (measured: four runs, every loss equal to the last digit of its
float repr), so there is no run-to-run noise to absorb; 1e-4 only leaves room for a different summation order
in another torch/BLAS build (fp32 rounding, ~1e-7 relative per operation, compounding over 20 steps), the same
tolerance as tests/test_training.py's fast-path check. If a library update moves them, re-record on the
pre-change code and say so in the commit.
"""

from __future__ import annotations

import pytest

from tests.conftest import PT_DATA, ROOT
from yak.training import parse_train_args, run_training

MERGED_TOKENIZER = ROOT / "tokenizer" / "stories260K_bo" / "merged_tokenizer_hf"
STEPS = 20
REL = 1e-4

# Recorded on commit 65d4703 (before training.py / generation.py became packages), CPU, fp32, 1 thread.
GOLDEN_STAGE1 = [
    14.187726974487305, 19.739173889160156, 14.93069076538086, 14.694291114807129, 24.49944496154785,
    13.968611717224121, 13.742508888244629, 19.094606399536133, 18.040964126586914, 14.22984504699707,
    14.238578796386719, 18.51969337463379, 23.460655212402344, 23.314298629760742, 23.075786590576172,
    22.869565963745117, 18.228132247924805, 22.58008575439453, 22.19784927368164, 9.28549575805664,
]
GOLDEN_STAGE2 = [
    12.884325981140137, 18.05101776123047, 10.44824504852295, 7.534182548522949, 8.056516647338867,
    6.809895038604736, 6.458092212677002, 7.576877117156982, 6.729032039642334, 6.542160987854004,
    6.36586332321167, 6.75786018371582, 7.301988124847412, 7.66287088394165, 7.5051422119140625,
    7.169336795806885, 6.358733177185059, 7.483153820037842, 6.884405612945557, 5.141262531280518,
]
GOLDEN_SFT = [
    5.392467975616455, 7.701058387756348, 6.577104091644287, 6.434593677520752, 6.48656702041626,
    7.614394664764404, 8.02404499053955, 6.176363468170166, 5.061472415924072, 5.488368988037109,
    5.867664813995361, 6.689284801483154, 4.9596076011657715, 5.3530473709106445, 4.951898097991943,
    5.0858540534973145, 4.792670726776123, 6.031495571136475, 4.885588645935059, 5.584788799285889,
]


def _common(output_dir, cache_dir) -> list[str]:
    return [
        "--model_name_or_path", str(ROOT / "models" / "stories260K"),
        "--data_cache_dir", str(cache_dir),
        "--output_dir", str(output_dir),
        "--per_device_train_batch_size", "4",
        "--max_steps", str(STEPS),
        "--learning_rate", "2e-3",
        "--warmup_steps", "3",
        "--lr_scheduler_type", "cosine",
        "--use_cpu", "--report_to", "none", "--logging_steps", "1", "--save_steps", "1000",
        "--seed", "11", "--dataloader_num_workers", "0", "--plot_loss", "false",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, list[float]]:
    """Stage 1, then stage 2 on its adapter, then SFT on both: each run's per-step training losses."""
    root = tmp_path_factory.mktemp("golden")
    pt = root / "pt"
    for src, n in (
        ("bo/mila.txt", 10),
        ("en/austen_pride_and_prejudice.txt", 200),
        ("zh/hongloumeng_ch001-080.txt", 10),
    ):
        (pt / src).parent.mkdir(parents=True, exist_ok=True)
        lines = (PT_DATA / src).read_text(encoding="utf-8").splitlines(keepends=True)[:n]
        (pt / src).write_text("".join(lines), encoding="utf-8")
    cache = root / "cache"
    pt_args = ["--tokenizer_name_or_path", str(MERGED_TOKENIZER), "--dataset_dir", str(pt)]
    pt_args += ["--block_size", "32"]
    lora = ["--lora_rank", "4", "--lora_alpha", "8", "--lora_dropout", "0.05"]
    s1, s2, sft = root / "s1", root / "s2", root / "sft"
    out = {}
    out["stage1"] = run_training(*parse_train_args([*_common(s1, cache), *pt_args, "--stage", "1"]))["losses"]
    out["stage2"] = run_training(
        *parse_train_args([*_common(s2, cache), *pt_args, "--stage", "2", "--adapters", str(s1), *lora])
    )["losses"]
    out["sft"] = run_training(
        *parse_train_args(
            [
                *_common(sft, cache),
                "--task", "sft",
                "--adapters", str(s1), str(s2),
                "--dataset_dir", str(ROOT / "data" / "sft"),
                "--max_seq_length", "256",
                *lora,
            ]  # fmt: skip
        )
    )["losses"]
    return out


@pytest.mark.parametrize(
    "run, golden", [("stage1", GOLDEN_STAGE1), ("stage2", GOLDEN_STAGE2), ("sft", GOLDEN_SFT)]
)
def test_first_20_losses_are_the_recorded_ones(runs, run, golden):
    assert len(runs[run]) == STEPS
    assert runs[run] == pytest.approx(golden, rel=REL), f"{run} losses: {runs[run]!r}"
