"""Training throughput on one GPU: the naive Hugging Face + PEFT setup against the project's trainer, in one run.

Both train the same Llama-2-shaped model (random weights, built on the GPU) on the same random blocks:

* naive: ``Trainer`` + peft LoRA r64/alpha128 on the seven projections, ``embed_tokens``/``lm_head`` in
  ``modules_to_save``, bf16 weights, SDPA, gradient checkpointing (the setup of ../shared/bench, i.e. the
  original project's ``run_pt.sh``); stage 1 trains the embeddings only;
* project: ``yak.training.model.build_model`` + ``YakTrainer`` (LoRA+ groups, embedding learning rate, fp32
  trainable weights), with the speed options of ``run_pt.sh`` on GPUs: ``--compile_layers`` and no
  gradient checkpointing.

Prints one ``RESULT`` line per setup (tokens/s, step time, peak memory, MFU) and a table with the ratios.
MFU counts, per token: forward and input-gradient passes through the frozen body (4 N), the lm_head forward,
input and weight gradients (6 V d), the adapters (6 N_lora) and attention (12 L T d); recomputation is not
counted. Peak: 989 TFLOP/s dense bf16 (H100/H200).

    python bench/train_throughput.py                    # stage 2 and stage 1, 7B shape, block 1024
    python bench/train_throughput.py --stages 2 --shape 13b --project_batch 2 --ckpt --skip_naive
    torchrun --nproc_per_node 4 bench/train_throughput.py --stages 2 --skip_naive --deepspeed ds_z2_config.json

Under torchrun every process trains on its own GPU; the figures are per GPU (rank 0's step time, which
includes the gradient exchange), so they compare directly with a one-GPU run.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

SHAPES = {  # hidden, intermediate, layers, heads
    "7b": (4096, 11008, 32, 32),
    "13b": (5120, 13824, 40, 40),
}
TARGETS = ["q_proj", "v_proj", "k_proj", "o_proj", "gate_proj", "down_proj", "up_proj"]
PEAK_FLOPS = 989e12


def random_model(shape: str, vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, layers, heads = SHAPES[shape]
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096)
    with torch.device("cuda"):
        return LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")


def flops_per_token(shape: str, vocab: int, block: int, stage: int, rank: int = 64) -> float:
    hidden, inter, layers, _ = SHAPES[shape]
    body = layers * (4 * hidden * hidden + 3 * hidden * inter)
    lora = 0 if stage == 1 else layers * rank * (4 * 2 * hidden + 3 * (hidden + inter))
    return 4 * body + 6 * vocab * hidden + 6 * lora + 12 * layers * block * hidden


class RandomBlocks(torch.utils.data.Dataset):
    def __init__(self, n: int, block: int, vocab: int):
        self.n, self.block, self.vocab = n, block, vocab

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return {"input_ids": torch.randint(0, self.vocab, (self.block,), generator=g).tolist()}


def step_timer():
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_begin(self, *args, **kwargs):
            torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.t0)

    return Timer()


def training_args(bs: int, steps: int, ckpt: bool, deepspeed: str | None = None, liger: bool = False):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=bs, max_steps=steps, bf16=True,
        gradient_checkpointing=ckpt, gradient_checkpointing_kwargs={"use_reentrant": False} if ckpt else None,
        logging_steps=10_000, save_strategy="no", report_to=[], learning_rate=2e-5, dataloader_num_workers=2,
        deepspeed=deepspeed, use_liger_kernel=liger, disable_tqdm=True,
    )


def profiler(first_step: int, steps: int = 2):
    """A callback that profiles ``steps`` steps from ``first_step`` and prints where the GPU time goes."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    class Profile(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == first_step:
                torch.cuda.synchronize()
                self.prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
                self.prof.__enter__()
                self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == first_step + steps:
                torch.cuda.synchronize()
                wall = time.perf_counter() - self.t0
                self.prof.__exit__(None, None, None)
                events = self.prof.key_averages()
                gpu = sum(e.self_device_time_total for e in events) / 1e6
                report(f"PROFILE {steps} steps: wall {wall:.3f} s, GPU kernels {gpu:.3f} s "
                       f"({100 * gpu / wall:.0f}% busy)")
                report(events.table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=70))

    return Profile()


def report(line: str) -> None:
    """Print on the first process only (all processes under torchrun measure the same thing)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(line, flush=True)


def naive_trainer(model, stage: int, args, dataset, callbacks):
    import peft
    from transformers import Trainer

    from yak.training.run import collate_blocks

    if stage == 1:
        for n, p in model.named_parameters():
            p.requires_grad = "embed_tokens" in n or "lm_head" in n
    else:
        model = peft.get_peft_model(model, peft.LoraConfig(
            r=64, lora_alpha=128, lora_dropout=0.05, task_type="CAUSAL_LM", target_modules=TARGETS,
            modules_to_save=["embed_tokens", "lm_head"]))
    return Trainer(model=model, args=args, train_dataset=dataset, data_collator=collate_blocks, callbacks=callbacks)


def project_trainer(model, stage: int, args, dataset, callbacks, tokenizer_dir: str, compile_layers: bool):
    from yak.source import ModelSource
    from yak.tokenizer import load_tokenizer
    from yak.training.arguments import StageArguments
    from yak.training.model import build_model
    from yak.training.run import collate_blocks
    from yak.training.trainer import YakTrainer

    source = ModelSource(base_model="random", tokenizer_path=tokenizer_dir, dtype="bfloat16")
    stage_args = StageArguments(task="pt", stage=stage, base_tokenizer_name_or_path=tokenizer_dir,
                                compile_layers=compile_layers)
    tokenizer = load_tokenizer(tokenizer_dir)
    model = build_model(source, stage_args, tokenizer, args, model=model)
    return YakTrainer(model=model, args=args, train_dataset=dataset, data_collator=collate_blocks,
                      callbacks=callbacks, loraplus_lr_ratio=stage_args.loraplus_lr_ratio if stage == 2 else 1.0,
                      embedding_learning_rate=stage_args.embedding_learning_rate, base_model_name_or_path="random")


def measure(name: str, path: str, stage: int, bs: int, opts, ckpt: bool, compile_layers: bool = False,
            liger: bool = False) -> dict:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    profiling = opts.profile and path == "project"
    steps = opts.warmup + opts.steps + (2 if profiling else 0)  # profiled steps come after the timed ones
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dataset = RandomBlocks(bs * steps * world, opts.block, opts.vocab)
    callbacks = [step_timer()] + ([profiler(opts.warmup + opts.steps)] if profiling else [])
    args = training_args(bs, steps, ckpt, opts.deepspeed, liger)
    try:
        torch.manual_seed(0)
        model = random_model(opts.shape, opts.vocab)
        if path == "naive":
            trainer = naive_trainer(model, stage, args, dataset, callbacks)
        else:
            trainer = project_trainer(model, stage, args, dataset, callbacks, opts.tokenizer, compile_layers)
        trainer.train()
        times = sorted(callbacks[0].times[opts.warmup:opts.warmup + opts.steps])
        step = times[len(times) // 2]
        tok_s = bs * opts.block / step
        mfu = tok_s * flops_per_token(opts.shape, opts.vocab, opts.block, stage) / PEAK_FLOPS
        peak = torch.cuda.max_memory_allocated() / 2**30
        row = {"name": name, "stage": stage, "bs": bs, "tok_s": tok_s, "peak": peak, "mfu": mfu}
        report(f"RESULT {name}: stage={stage} shape={opts.shape} block={opts.block} bs={bs} ckpt={ckpt} "
               f"compile={compile_layers} liger={liger} gpus={world} deepspeed={opts.deepspeed} "
               f"step_s={step:.3f} tok/s/GPU={tok_s:.0f} peakGiB={peak:.1f} mfu={100 * mfu:.1f}%")
    except Exception as e:  # report and go on with the next setup (e.g. out of memory)
        report(f"RESULT {name}: FAILED {type(e).__name__}: {str(e)[:300]}")
        row = {"name": name, "stage": stage, "bs": bs, "tok_s": float("nan"), "peak": float("nan"), "mfu": 0.0}
    finally:
        trainer = model = None
        torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 1], choices=[1, 2])
    parser.add_argument("--shape", default="7b", choices=sorted(SHAPES))
    parser.add_argument("--vocab", type=int, default=64000, help="rows of the embeddings (the shipped merged "
                        "Llama 2 + Tibetan tokenizer has 64,000)")
    parser.add_argument("--tokenizer", default="tokenizer/merged_tokenizer_hf",
                        help="tokenizer folder for the project path; at most --vocab tokens")
    parser.add_argument("--block", type=int, default=1024)
    parser.add_argument("--naive_batch", type=int, default=8)
    parser.add_argument("--project_batch", type=int, nargs="+", default=[4],
                        help="stage-2 batch sizes of the project path (stage 1 uses --stage1_batch)")
    parser.add_argument("--stage1_batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed first steps (compilation)")
    parser.add_argument("--skip_naive", action="store_true")
    parser.add_argument("--ckpt", action="store_true", help="project path with gradient checkpointing")
    parser.add_argument("--no_compile", action="store_true", help="project path without --compile_layers")
    parser.add_argument("--liger", action="store_true",
                        help="also measure the project path with Liger kernels (train.py --use_liger_kernel)")
    parser.add_argument("--deepspeed", help="DeepSpeed config for both paths (run under torchrun)")
    parser.add_argument("--profile", action="store_true", help="print the project path's top GPU kernels")
    opts = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/train_throughput.py needs a CUDA GPU")
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    report(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, "
           f"{os.environ.get('WORLD_SIZE', '1')} process(es)")

    rows = []
    for stage in opts.stages:
        if not opts.skip_naive:
            rows.append(measure(f"naive-stage{stage}", "naive", stage, opts.naive_batch, opts, ckpt=True))
        for bs in opts.project_batch if stage == 2 else [opts.stage1_batch]:
            for liger in [False, True] if opts.liger else [False]:
                rows.append(measure(f"yak-stage{stage}-bs{bs}" + ("-liger" if liger else ""), "project", stage,
                                    bs, opts, ckpt=opts.ckpt, compile_layers=not opts.no_compile, liger=liger))

    report("\n| setup | stage | batch | tokens/s per GPU | vs naive | peak GiB | MFU |\n|---|---|---|---|---|---|---|")
    for r in rows:
        base = next((b["tok_s"] for b in rows if b["name"] == f"naive-stage{r['stage']}"), float("nan"))
        report(f"| {r['name']} | {r['stage']} | {r['bs']} | {r['tok_s']:,.0f} | {r['tok_s'] / base:.2f}x | "
               f"{r['peak']:.1f} | {100 * r['mfu']:.1f}% |")


if __name__ == "__main__":
    main()
