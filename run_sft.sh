#!/usr/bin/env bash
# Instruction tuning (SFT) with LoRA+, loss on the assistant answers only: train.py --task sft under torchrun.
# Variables first, as in the original scripts; then one torchrun command. See docs/sft.md.
#
#   bash run_sft.sh                     # the tiny model on data/sft, on the CPU (a minute or two)
#   ADAPTERS="output/pt/stage1 output/pt/stage2" bash run_sft.sh     # on top of run_pt.sh's outputs
#   BASE=/models/llama-2-7b TOKENIZER=tokenizer/merged_tokenizer_hf DATA=/data/sft GPUS=8 DEVICE=gpu \
#     DTYPE=bfloat16 DEEPSPEED=ds_z2_config.json LR=1e-4 bash run_sft.sh
#
# Three starting points: a base model (BASE + the merged TOKENIZER; the new rows are trained through
# MODULES_TO_SAVE), a merged CPT model (BASE=the merged folder, TOKENIZER="" for its own), or a base model
# + the CPT outputs (ADAPTERS, applied in order; the tokenizer then comes from them). Any variable below can
# be set from the environment. Extra arguments go to train.py (e.g. --packing true --max_steps 500; python
# train.py --help lists them).
set -euo pipefail
if [ "${1:-}" = "--help" ] || [ "${1:-}" = "-h" ]; then  # the comment block above is the help
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
  exit 0
fi
cd "$(dirname "$0")"

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

if [ "$DEVICE" = cpu ]; then
  EXTRA=(--use_cpu)
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
else
  EXTRA=(--gradient_checkpointing)
fi
[ -n "$DEEPSPEED" ] && EXTRA+=(--deepspeed "$DEEPSPEED")
# shellcheck disable=SC2206  # ADAPTERS is a space-separated list of folders
[ -n "$ADAPTERS" ] && EXTRA+=(--adapters $ADAPTERS)
[ -n "$TOKENIZER" ] && EXTRA+=(--tokenizer_name_or_path "$TOKENIZER")
[ -n "${SYSTEM_PROMPT+set}" ] && EXTRA+=(--system_prompt "$SYSTEM_PROMPT")
[ "$VALIDATION" != 0 ] && EXTRA+=(--eval_strategy steps --eval_steps "$SAVE_STEPS")

if [ "$NODES" = 1 ] && [ -z "$MASTER_PORT" ]; then  # one node: a free port, so runs side by side never collide
  LAUNCH=(torchrun --standalone --nproc_per_node "$GPUS")
else
  LAUNCH=(torchrun --nnodes "$NODES" --node_rank "$NODE_RANK" --nproc_per_node "$GPUS"
          --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}")
fi
"${LAUNCH[@]}" train.py \
  --task sft --model_name_or_path "$BASE" \
  --dataset_dir "$DATA" --data_cache_dir "$CACHE" --validation_split_percentage "$VALIDATION" \
  --max_seq_length "$MAX_SEQ_LENGTH" --packing "$PACKING" --preprocessing_num_workers "$WORKERS" \
  --torch_dtype "$DTYPE" \
  --lora_rank "$LORA_RANK" --lora_alpha "$LORA_ALPHA" --lora_dropout "$LORA_DROPOUT" \
  --trainable "$TRAINABLE" --modules_to_save "$MODULES_TO_SAVE" \
  --learning_rate "$LR" --loraplus_lr_ratio "$LORAPLUS_RATIO" --embedding_learning_rate "$EMBEDDING_LR" \
  --per_device_train_batch_size "$BATCH" --per_device_eval_batch_size "$BATCH" \
  --gradient_accumulation_steps "$GRAD_ACC" --num_train_epochs "$EPOCHS" \
  --lr_scheduler_type cosine --warmup_ratio "$WARMUP_RATIO" --weight_decay 0 \
  --logging_steps 10 --save_steps "$SAVE_STEPS" --save_total_limit 3 \
  --seed 42 --report_to none "${EXTRA[@]}" \
  --output_dir "$OUT" "$@"

echo "done: the SFT adapter is in $OUT (apply after ${ADAPTERS:-the base model}: docs/formats.md)"
