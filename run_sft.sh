#!/bin/sh
# Instruction tuning (SFT) with LoRA+, loss on the assistant answers only: train.py --task sft, run by
# yak/pipeline.py. Variables first, as in the original scripts. See docs/sft.md.
#
#   sh run_sft.sh                       # the tiny model on data/sft, on the CPU (a minute or two)
#   ADAPTERS="output/pt/stage1 output/pt/stage2" sh run_sft.sh     # on top of run_pt.sh's outputs
#   BASE=/models/llama-2-7b TOKENIZER=tokenizer/merged_tokenizer_hf DATA=/data/sft GPUS=8 DEVICE=gpu \
#     DTYPE=bfloat16 DEEPSPEED=ds_z2_config.json LR=1e-4 sh run_sft.sh
#
# Three starting points: a base model (BASE + the merged TOKENIZER; the new rows are trained through
# MODULES_TO_SAVE), a merged CPT model (BASE=the merged folder, TOKENIZER="" for its own), or a base model
# + the CPT outputs (ADAPTERS, applied in order; the tokenizer then comes from them). Any variable below can
# be set from the environment. Extra arguments go to train.py (e.g. --packing true --max_steps 500; python3
# train.py --help lists them). Started again, a finished run is skipped (it says so) and an unfinished one
# resumes. Runs under any POSIX sh (dash, bash); PYTHON picks the interpreter (default python3).
set -a  # every variable below is exported to the pipeline
cd "$(dirname "$0")" || exit 2

BASE=${BASE:-models/stories260K}            # base or merged model (HF folder, safetensors)
ADAPTERS=${ADAPTERS:-}                      # CPT outputs to apply first ("output/pt/stage1 output/pt/stage2")
if [ -n "$ADAPTERS" ]; then
  TOKENIZER=${TOKENIZER:-}                  # default: the adapters' tokenizer
else
  TOKENIZER=${TOKENIZER-tokenizer/stories260K_bo/merged_tokenizer_hf}   # "" = the model's own
fi
DATA=${DATA:-data/sft}                      # *.json / *.jsonl, Alpaca or chat records
CACHE=${CACHE:-data_cache}                  # tokenized conversations, keyed by content + tokenizer
VALIDATION=${VALIDATION:-1}                 # percent of the conversations held out
OUT=${OUT:-output/sft}
DEVICE=${DEVICE:-cpu}                       # cpu or gpu
GPUS=${GPUS:-1}                             # processes (GPUs) per node
NODES=${NODES:-1}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-}                # empty on one node: torchrun --standalone takes a free port
NODE_RANK=${NODE_RANK:-0}

LR=${LR:-2e-4}                              # LoRA A (B learns LORAPLUS_RATIO times faster)
EMBEDDING_LR=${EMBEDDING_LR:-$LR}
LORAPLUS_RATIO=${LORAPLUS_RATIO:-16}
LORA_RANK=${LORA_RANK:-64}
LORA_ALPHA=${LORA_ALPHA:-128}
LORA_DROPOUT=${LORA_DROPOUT:-0.05}
TRAINABLE=${TRAINABLE:-q_proj,v_proj,k_proj,o_proj,gate_proj,down_proj,up_proj}
MODULES_TO_SAVE=${MODULES_TO_SAVE:-embed_tokens,lm_head}
MAX_SEQ_LENGTH=${MAX_SEQ_LENGTH:-512}       # 1024 or more for Llama 2 (the tiny model has 512 positions)
PACKING=${PACKING:-false}                   # several conversations per sequence (docs/sft.md)
BATCH=${BATCH:-8}                           # per device
GRAD_ACC=${GRAD_ACC:-1}
EPOCHS=${EPOCHS:-3}
WARMUP_RATIO=${WARMUP_RATIO:-0.03}
SAVE_STEPS=${SAVE_STEPS:-100}               # also the evaluation interval
WORKERS=${WORKERS:-1}                       # tokenization processes
DTYPE=${DTYPE:-float32}                     # the one dtype option: bfloat16 on GPUs (bf16 training follows)
DEEPSPEED=${DEEPSPEED:-}                    # e.g. ds_z2_config.json (or ds_z3_config.json) on GPUs
# SYSTEM_PROMPT: unset = the chat template's default; "" = no system block; else that text.

PYTHON=${PYTHON:-$(command -v python3 || command -v python || echo python3)}
exec "$PYTHON" -m yak.pipeline sft "$@"
