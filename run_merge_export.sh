#!/usr/bin/env bash
# Merge the trained parts into the base model, then export for llama.cpp (GGUF f16 + 4-bit).
# Edit the paths below (or pass them as environment variables) and run: bash run_merge_export.sh
set -euo pipefail
if [ "${1:-}" = "--help" ] || [ "${1:-}" = "-h" ]; then  # the comment block above is the help
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
  exit 0
fi

base_model=${base_model:-path/to/llama-2-7b-hf}
# applied in this order: stage-1 embeddings, CPT (stage 2) adapter, SFT adapter; drop what you do not have
lora_model=${lora_model:-output/pt/stage1,output/pt/stage2,output/sft}   # where run_pt.sh and run_sft.sh write
output_dir=${output_dir:-output/merged-hf}
output_dtype=${output_dtype:-float16}
gguf_dir=${gguf_dir:-output/merged-gguf}
quant_types=${quant_types:-q4_0}
# a llama.cpp checkout; leave empty to use the llama.cpp sources of the llama-cpp-python package (cached)
llama_cpp_dir=${llama_cpp_dir:-}
check_file=${check_file:-data/heldout/bo_modern_nanhai_deseg_heldout.txt}

python merge_lora_low_mem.py \
    --base_model "${base_model}" \
    --lora_model "${lora_model}" \
    --output_type huggingface \
    --output_dtype "${output_dtype}" \
    --max_shard_size 5GB \
    --output_dir "${output_dir}"

# Meta's consolidated.NN.pth layout instead (or as well):
# python merge_lora_low_mem.py --base_model "${base_model}" --lora_model "${lora_model}" \
#     --output_type pth --output_dir output/merged-pth

python export_gguf.py \
    --model_dir "${output_dir}" \
    --output_dir "${gguf_dir}" \
    --outtype f16 \
    --quant_types "${quant_types}" \
    --check_file "${check_file}" \
    ${llama_cpp_dir:+--llama_cpp_dir "${llama_cpp_dir}"}

# Chat with llama.cpp (a llama.cpp build), or llama-cpp-python's server (pip install 'llama-cpp-python[server]'):
#   llama-cli -m "${gguf_dir}/$(basename "${output_dir}")-q4_0.gguf" -cnv --chat-template llama2
#   python -m llama_cpp.server --model "${gguf_dir}/$(basename "${output_dir}")-q4_0.gguf" --host 127.0.0.1
