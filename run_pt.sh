#!/bin/sh
# Continued pretraining in two stages: stage 1 trains the embeddings only, stage 2 adds LoRA+ and keeps
# training them. Variables first, as in the original run_pt.sh; yak/pipeline.py runs the stages.
#
#   sh run_pt.sh                        # the tiny model on data/pt, on the CPU (a few minutes)
#   BASE=/models/llama-2-7b TOKENIZER=tokenizer/merged_tokenizer_hf DEVICE=gpu GPUS=8 sh run_pt.sh
#
# GPU defaults follow the original run_pt.sh (block 256, batch 12 x 8 accumulation, LoRA r64/alpha128,
# bf16, cosine, DeepSpeed ZeRO-2), with the length as a token budget and the warm-up in steps instead of
# --num_train_epochs 100000 --warmup_ratio 0.05, and per-layer compilation instead of gradient
# checkpointing (faster, same training semantics; GRAD_CKPT=1 when memory is short).
#
# Writes $OUT/stage1 and $OUT/stage2 (OUT=output/pt). Started again with the same command, it skips a finished
# stage (it says so) and an unfinished one resumes from its newest complete checkpoint (docs/training.md);
# --overwrite_output_dir trains both stages again. One process without DeepSpeed runs train.py directly,
# more (GPUS, NODES) or DeepSpeed run it under torchrun.
#
# Any variable below can be set from the environment. Extra arguments go to both stages (python3 train.py
# --help lists them). Runs under any POSIX sh (dash, bash); PYTHON picks the interpreter (default python3).
set -a  # every variable below is exported to the pipeline
cd "$(dirname "$0")" || exit 2

DEVICE=${DEVICE:-cpu}                       # cpu or gpu
if [ "$DEVICE" = cpu ]; then                # a small run of the tiny model: minutes on a laptop (unless set)
  : "${BLOCK_SIZE:=64}" "${BATCH:=8}" "${GRAD_ACC:=1}" "${DTYPE:=float32}" "${WARMUP_STEPS:=5}"
  : "${STAGE1_TOKENS:=51200}" "${STAGE2_TOKENS:=51200}" "${LOGGING_STEPS:=5}" "${STAGE1_LR:=5e-3}"
  : "${LR:=1e-3}" "${LORA_RANK:=8}" "${LORA_ALPHA:=16}"
fi
BASE=${BASE:-models/stories260K}                                     # base model (HF folder, safetensors)
TOKENIZER=${TOKENIZER:-tokenizer/stories260K_bo/merged_tokenizer_hf}   # the merged tokenizer
DATA=${DATA:-data/pt}                       # one sub-folder per source: bo/ en/ zh/ (*.txt, *.jsonl)
CACHE=${CACHE:-data_cache}                  # tokenized blocks, keyed by file content + tokenizer
OUT=${OUT:-output/pt}                       # stage 1 -> $OUT/stage1, stage 2 -> $OUT/stage2
GPUS=${GPUS:-1}                             # processes (GPUs) per node
NODES=${NODES:-1}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-}                # empty on one node: torchrun --standalone takes a free port
NODE_RANK=${NODE_RANK:-0}

LR=${LR:-2e-4}                              # LoRA A (B learns LORAPLUS_RATIO times faster)
EMBEDDING_LR=${EMBEDDING_LR:-$LR}
STAGE1_LR=${STAGE1_LR:-1e-3}                # stage 1 trains only the embeddings
LORAPLUS_RATIO=${LORAPLUS_RATIO:-16}
LORA_RANK=${LORA_RANK:-64}
LORA_ALPHA=${LORA_ALPHA:-128}
LORA_DROPOUT=${LORA_DROPOUT:-0.05}
TRAINABLE=${TRAINABLE:-q_proj,v_proj,k_proj,o_proj,gate_proj,down_proj,up_proj}
MODULES_TO_SAVE=${MODULES_TO_SAVE:-embed_tokens,lm_head}
BLOCK_SIZE=${BLOCK_SIZE:-256}
BATCH=${BATCH:-12}                          # per device
GRAD_ACC=${GRAD_ACC:-8}
STAGE1_TOKENS=${STAGE1_TOKENS:-100000000}   # training length as a token budget (not epochs)
STAGE2_TOKENS=${STAGE2_TOKENS:-1000000000}
WARMUP_STEPS=${WARMUP_STEPS:-100}           # warm-up in steps
SAVE_STEPS=${SAVE_STEPS:-100}
LOGGING_STEPS=${LOGGING_STEPS:-10}
DTYPE=${DTYPE:-bfloat16}                    # the one dtype option (bf16 mixed precision follows from it)
DEEPSPEED=${DEEPSPEED-ds_z2_config.json}    # GPUs: or ds_z3_config.json for models that do not fit; empty: none
COMPILE_LAYERS=${COMPILE_LAYERS:-1}         # GPUs: per-layer torch.compile, ~1.9x faster (bench/RESULTS.md)
GRAD_CKPT=${GRAD_CKPT:-0}                   # GPUs: 1 = gradient checkpointing (less memory, slower; 13B)

PYTHON=${PYTHON:-$(command -v python3 || command -v python || echo python3)}
exec "$PYTHON" -m yak.pipeline pt "$@"
