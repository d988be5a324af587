"""Shared fixtures: paths to the shipped tiny model, the shipped samples, and ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

# The tiny model's tensors are small: one thread per process is fastest, and CI has only 2 cores shared by
# the test process and the servers / torchrun workers it starts (inherited through the environment).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY_MODEL = ROOT / "models" / "stories260K"
PT_DATA = ROOT / "data" / "pt"
HELDOUT = ROOT / "data" / "heldout"
SHARED_DATA = ROOT.parent / "shared" / "data"


def pytest_configure(config):
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    return TINY_MODEL


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not present")
    return SHARED_DATA


@pytest.fixture(scope="session")
def untied_model_dir(tiny_model_dir, tmp_path_factory):
    """A small untied Llama (random weights) sharing the tiny model's tokenizer."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("untied")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=512,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(cfg).save_pretrained(str(out))
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tiny_model_dir / name, out / name)
    return out
