#!/usr/bin/env bash
# Instruction tuning (SFT) with LoRA+: train.py --task sft under torchrun. See docs/sft.md.
#
# Start from one of:
#   - a base model:         pretrained_model=path/to/llama-2-7b-hf, tokenizer_path=tokenizer/merged_tokenizer_hf
#                           (the new Tibetan rows are added and trained through modules_to_save);
#   - a merged CPT model:   pretrained_model=path/to/merged (merge_lora_low_mem.py output), tokenizer_path=""
#                           (its own tokenizer);
#   - base + CPT outputs:   pretrained_model=path/to/llama-2-7b-hf, cpt_adapters="out/stage1 out/stage2"
#                           (applied in order before the SFT adapter; the tokenizer comes from them).
# Every variable below can be set from the environment (pretrained_model=... ./run_sft.sh); extra options
# are passed on to train.py (./run_sft.sh --max_steps 100). The output folder is a peft LoRA adapter plus
# the tokenizer with its chat template (docs/formats.md).
set -euo pipefail

lr=${lr-1e-4}
lora_rank=${lora_rank-64}
lora_alpha=${lora_alpha-128}
lora_trainable=${lora_trainable-"q_proj,v_proj,k_proj,o_proj,gate_proj,down_proj,up_proj"}
modules_to_save=${modules_to_save-"embed_tokens,lm_head"}
lora_dropout=${lora_dropout-0.05}
loraplus_lr_ratio=${loraplus_lr_ratio-16}

pretrained_model=${pretrained_model-path/to/llama-2-7b-hf}
cpt_adapters=${cpt_adapters-""}
tokenizer_path=${tokenizer_path-tokenizer/merged_tokenizer_hf}
dataset_dir=${dataset_dir-data/sft}
data_cache=${data_cache-data_cache}
validation_split_percentage=${validation_split_percentage-1}
per_device_train_batch_size=${per_device_train_batch_size-4}
per_device_eval_batch_size=${per_device_eval_batch_size-4}
gradient_accumulation_steps=${gradient_accumulation_steps-8}
max_seq_length=${max_seq_length-1024}
num_train_epochs=${num_train_epochs-2}
output_dir=${output_dir-out/sft}
deepspeed_config_file=${deepspeed_config_file-ds_z2_config.json}
torch_dtype=${torch_dtype-bfloat16}
preprocessing_num_workers=${preprocessing_num_workers-8}
nproc_per_node=${nproc_per_node-1}
# system_prompt: unset = the chat template's default; "" = no system block; else the text.

optional=()
[[ -n "${cpt_adapters}" ]] && optional+=(--adapters ${cpt_adapters})
[[ -n "${tokenizer_path}" ]] && optional+=(--tokenizer_name_or_path "${tokenizer_path}")
[[ -n "${deepspeed_config_file}" ]] && optional+=(--deepspeed "${deepspeed_config_file}")
[[ -n "${system_prompt+set}" ]] && optional+=(--system_prompt "${system_prompt}")

torchrun --nnodes 1 --nproc_per_node "${nproc_per_node}" train.py \
    --task sft \
    --model_name_or_path "${pretrained_model}" \
    --dataset_dir "${dataset_dir}" \
    --data_cache_dir "${data_cache}" \
    --validation_split_percentage "${validation_split_percentage}" \
    --max_seq_length "${max_seq_length}" \
    --per_device_train_batch_size "${per_device_train_batch_size}" \
    --per_device_eval_batch_size "${per_device_eval_batch_size}" \
    --gradient_accumulation_steps "${gradient_accumulation_steps}" \
    --num_train_epochs "${num_train_epochs}" \
    --lr_scheduler_type cosine \
    --learning_rate "${lr}" \
    --warmup_ratio 0.03 \
    --weight_decay 0 \
    --logging_strategy steps \
    --logging_steps 10 \
    --logging_first_step true \
    --save_strategy steps \
    --save_steps 200 \
    --save_total_limit 3 \
    --eval_strategy steps \
    --eval_steps 100 \
    --preprocessing_num_workers "${preprocessing_num_workers}" \
    --output_dir "${output_dir}" \
    --torch_dtype "${torch_dtype}" \
    --gradient_checkpointing \
    --ddp_find_unused_parameters false \
    --lora_rank "${lora_rank}" \
    --lora_alpha "${lora_alpha}" \
    --lora_dropout "${lora_dropout}" \
    --trainable "${lora_trainable}" \
    --modules_to_save "${modules_to_save}" \
    --loraplus_lr_ratio "${loraplus_lr_ratio}" \
    --report_to none \
    "${optional[@]}" \
    "$@"
