#!/usr/bin/env bash
# Continued pretraining in two stages: stage 1 trains the embeddings only, stage 2 adds LoRA+ and keeps
# training them. Variables first, as in the original run_pt.sh; then one torchrun command per stage.
#
#   bash run_pt.sh                      # the tiny model on data/pt, on the CPU (a few minutes)
#   BASE=/models/llama-2-7b TOKENIZER=tokenizer/merged_tokenizer_hf DEVICE=gpu GPUS=8 bash run_pt.sh
#
# GPU defaults follow the original run_pt.sh (block 256, batch 12 x 8 accumulation, LoRA r64/alpha128,
# bf16, cosine, DeepSpeed ZeRO-2), with the length as a token budget and the warm-up in steps instead of
# --num_train_epochs 100000 --warmup_ratio 0.05, and per-layer compilation instead of gradient
# checkpointing (faster, same training semantics; GRAD_CKPT=1 when memory is short).
#
# Writes $OUT/stage1 and $OUT/stage2 (OUT=output/pt). Started again with the same command after a crash, it
# skips a finished stage 1 and each stage resumes from its newest complete checkpoint (docs/training.md).
#
# Any variable below can be set from the environment. Extra arguments go to both stages (python train.py
# --help lists them).
set -euo pipefail
if [ "${1:-}" = "--help" ] || [ "${1:-}" = "-h" ]; then  # the comment block above is the help
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
  exit 0
fi
cd "$(dirname "$0")"

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
DEEPSPEED=${DEEPSPEED-ds_z2_config.json}    # or ds_z3_config.json for models that do not fit; empty: none
COMPILE_LAYERS=${COMPILE_LAYERS:-1}         # GPUs: per-layer torch.compile, ~1.9x faster (bench/RESULTS.md)
GRAD_CKPT=${GRAD_CKPT:-0}                   # GPUs: 1 = gradient checkpointing (less memory, slower; 13B)

if [ "$DEVICE" = cpu ]; then
  DEVICE_ARGS=(--use_cpu)
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
else
  DEVICE_ARGS=()
  [ "$COMPILE_LAYERS" = 1 ] && DEVICE_ARGS+=(--compile_layers)
  [ "$GRAD_CKPT" = 1 ] && DEVICE_ARGS+=(--gradient_checkpointing)
  [ -n "$DEEPSPEED" ] && DEVICE_ARGS+=(--deepspeed "$DEEPSPEED")
fi

COMMON=(
  --model_name_or_path "$BASE"
  --dataset_dir "$DATA" --data_cache_dir "$CACHE" --validation_split_percentage 1 --block_size "$BLOCK_SIZE"
  --torch_dtype "$DTYPE"
  --per_device_train_batch_size "$BATCH" --per_device_eval_batch_size "$BATCH"
  --gradient_accumulation_steps "$GRAD_ACC"
  --lr_scheduler_type cosine --warmup_steps "$WARMUP_STEPS" --weight_decay 0.01
  --logging_steps "$LOGGING_STEPS" --save_steps "$SAVE_STEPS" --save_total_limit 3
  --seed 42 --report_to none "${DEVICE_ARGS[@]}"
)
if [ "$NODES" = 1 ] && [ -z "$MASTER_PORT" ]; then  # one node: a free port, so runs side by side never collide
  LAUNCH=(torchrun --standalone --nproc_per_node "$GPUS")
else
  LAUNCH=(torchrun --nnodes "$NODES" --node_rank "$NODE_RANK" --nproc_per_node "$GPUS"
          --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}")
fi

# Stage 1: embeddings only; every other weight stays as in the base model.
# Started again after a crash in stage 2, the script goes on with stage 2 (which resumes from its checkpoint);
# with --overwrite_output_dir both stages are trained again (not stage 2 alone, on the old stage 1).
if [ -f "$OUT/stage1/yak_adapter.json" ] && [[ " $* " != *" --overwrite_output_dir "* ]]; then
  echo "stage 1 already finished in $OUT/stage1 (delete that folder to train it again): going on with stage 2"
else
  "${LAUNCH[@]}" train.py "${COMMON[@]}" \
    --stage 1 --tokenizer_name_or_path "$TOKENIZER" \
    --learning_rate "$STAGE1_LR" --max_train_tokens "$STAGE1_TOKENS" \
    --output_dir "$OUT/stage1" "$@"
fi

# Stage 2: LoRA+ on the projections, embeddings keep training; starts from stage 1's embeddings.
"${LAUNCH[@]}" train.py "${COMMON[@]}" \
  --stage 2 --adapters "$OUT/stage1" \
  --lora_rank "$LORA_RANK" --lora_alpha "$LORA_ALPHA" --lora_dropout "$LORA_DROPOUT" \
  --trainable "$TRAINABLE" --modules_to_save "$MODULES_TO_SAVE" \
  --learning_rate "$LR" --loraplus_lr_ratio "$LORAPLUS_RATIO" --embedding_learning_rate "$EMBEDDING_LR" \
  --max_train_tokens "$STAGE2_TOKENS" \
  --output_dir "$OUT/stage2" "$@"

echo "done: stage 1 in $OUT/stage1, stage 2 in $OUT/stage2 (apply both, in this order: docs/formats.md)"
