"""Peak memory and time of the streaming merge against a naive in-memory peft merge, in the same run.

Builds a Llama of about 1.6 B parameters (random bf16 weights, 28 layers, hidden 2048, vocabulary 32,000,
untied) in several safetensors shards, and a LoRA adapter on it (rank 64 on q, k, v, o, gate, up, down, plus
full embed_tokens/lm_head in modules_to_save, as stage 2 trains). Then, each in its own subprocess:

* ``yak``: ``yak.merge.merge`` (the code behind merge_lora_low_mem.py);
* ``naive``: ``AutoModelForCausalLM.from_pretrained`` + ``PeftModel.from_pretrained`` + ``merge_and_unload``
  + ``save_pretrained``, the usual way;

and prints ``RESULT`` lines with each one's peak resident memory (``ru_maxrss`` of the child from
``os.wait4``) and wall time, the largest input shard, and the largest difference between the two outputs.

    python bench/merge_memory.py --work_dir /tmp/yak-merge-bench
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

YAK = """
from yak.merge import MergeArguments, merge
from yak.source import ModelSource
merge(ModelSource({base!r}, [{adapter!r}]), MergeArguments(output_dir={out!r}, max_shard_size="1GB"))
"""
NAIVE = """
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({base!r}, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, {adapter!r}).merge_and_unload()
model.save_pretrained({out!r}, max_shard_size="1GB")
"""


def build_inputs(work: Path, layers: int, hidden: int, inter: int, vocab: int, shards: int, rank: int) -> dict:
    """Write the random base model (``shards`` safetensors files) and a peft adapter; return their sizes."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    base, adapter = work / "base", work / "adapter"
    for d in (base, adapter):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=16, num_key_value_heads=16, vocab_size=vocab,
                         tie_word_embeddings=False, dtype="bfloat16")
    config.save_pretrained(base)
    for f in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy2(ROOT / "models" / "stories260K" / f, base / f)
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (hidden, hidden),
                       p + "self_attn.v_proj.weight": (hidden, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
                       p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
                       p + "mlp.down_proj.weight": (hidden, inter), p + "input_layernorm.weight": (hidden,),
                       p + "post_attention_layernorm.weight": (hidden,)})
    total = sum(torch.Size(s).numel() for s in shapes.values())
    per_shard, names, weight_map, sizes = total / shards, list(shapes), {}, []
    g = torch.Generator().manual_seed(0)
    groups, cur, n = [], [], 0
    for k in names:
        cur.append(k)
        n += torch.Size(shapes[k]).numel()
        if n >= per_shard * (len(groups) + 1) and len(groups) < shards - 1:
            groups.append(cur)
            cur = []
    groups.append(cur)
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {k: (torch.randn(shapes[k], generator=g) * 0.02).to(torch.bfloat16) for k in group}
        save_file(tensors, base / fname, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, fname))
        sizes.append((base / fname).stat().st_size)
        del tensors
    (base / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total * 2}, "weight_map": weight_map}))

    LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, modules_to_save=["embed_tokens", "lm_head"],
               task_type="CAUSAL_LM").save_pretrained(adapter)
    lora = {}
    for k, shape in shapes.items():
        module = k.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] in TARGETS:
            lora[f"base_model.model.{module}.lora_A.weight"] = torch.randn(rank, shape[1], generator=g) * 0.01
            lora[f"base_model.model.{module}.lora_B.weight"] = torch.randn(shape[0], rank, generator=g) * 0.01
        elif module in ("model.embed_tokens", "lm_head"):
            lora[f"base_model.model.{k}"] = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
    save_file(lora, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    return {"params": total, "shards": len(groups), "largest_shard": max(sizes), "base_bytes": sum(sizes)}


def run_measured(code: str) -> tuple[float, float]:
    """Run ``code`` in a fresh Python; return (wall seconds, peak resident memory in bytes) of that child."""
    start = time.time()
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"child failed: {code}")
    return time.time() - start, usage.ru_maxrss * 1024  # ru_maxrss is in KiB on Linux


def max_difference(a: Path, b: Path, names: list[str]) -> float:
    from safetensors import safe_open
    def files(d):
        index = d / "model.safetensors.index.json"
        if index.exists():
            return json.loads(index.read_text())["weight_map"]
        return dict.fromkeys(names, "model.safetensors")

    fa, fb, worst = files(a), files(b), 0.0
    for k in names:
        with safe_open(str(a / fa[k]), "pt") as x, safe_open(str(b / fb[k]), "pt") as y:
            worst = max(worst, (x.get_tensor(k).float() - y.get_tensor(k).float()).abs().max().item())
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", default="/tmp/yak-merge-bench", help="scratch folder (about 10 GB)")
    parser.add_argument("--layers", type=int, default=28, help="decoder layers (28 -> 1.6 B parameters)")
    parser.add_argument("--hidden", type=int, default=2048, help="hidden size")
    parser.add_argument("--intermediate", type=int, default=5632, help="MLP size")
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary size")
    parser.add_argument("--shards", type=int, default=4, help="input shards")
    parser.add_argument("--rank", type=int, default=64, help="LoRA rank")
    parser.add_argument("--build_only", action="store_true", help="only write the inputs (used internally)")
    a = parser.parse_args()
    work = Path(a.work_dir)
    if a.build_only:
        info = build_inputs(work, a.layers, a.hidden, a.intermediate, a.vocab, a.shards, a.rank)
        (work / "inputs.json").write_text(json.dumps(info))
        return
    # Build in a child too: a child's ru_maxrss starts from its parent's resident memory at the fork (Linux
    # carries the high-water mark over exec), so this process must stay small while the merges are measured.
    subprocess.run([sys.executable, __file__, "--build_only", *sys.argv[1:]], check=True)
    info = json.loads((work / "inputs.json").read_text())
    print(f"RESULT inputs params={info['params'] / 1e9:.2f}B shards={info['shards']} "
          f"base_gib={info['base_bytes'] / 2**30:.2f} largest_shard_gib={info['largest_shard'] / 2**30:.2f}",
          flush=True)
    out = {}
    for name, code in (("yak", YAK), ("naive", NAIVE)):
        out[name] = work / f"merged-{name}"
        shutil.rmtree(out[name], ignore_errors=True)
        seconds, rss = run_measured(code.format(base=str(work / "base"), adapter=str(work / "adapter"),
                                                out=str(out[name])))
        print(f"RESULT merge={name} peak_rss_gib={rss / 2**30:.2f} time_s={seconds:.1f}", flush=True)
        out[name + "_rss"] = rss
    bound = info["largest_shard"] + 2**30
    print(f"RESULT yak_within_bound={out['yak_rss'] <= bound} bound_gib={bound / 2**30:.2f} "
          f"rss_ratio_naive_over_yak={out['naive_rss'] / out['yak_rss']:.1f}", flush=True)
    names = ["model.embed_tokens.weight", "lm_head.weight", "model.layers.0.self_attn.q_proj.weight",
             f"model.layers.{a.layers - 1}.mlp.down_proj.weight"]
    print(f"RESULT max_abs_diff_yak_vs_naive={max_difference(out['yak'], out['naive'], names):.2e} "
          "(bf16; peft adds the delta in bf16, yak in fp32 before rounding)", flush=True)


if __name__ == "__main__":
    main()
