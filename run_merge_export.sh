#!/bin/sh
# Merge the trained parts into the base model (Hugging Face and Meta .pth formats), then export for llama.cpp
# (GGUF f16 + 4-bit) when llama.cpp is installed. Edit the variables below (or set them in the environment)
# and run: sh run_merge_export.sh
#
#   GGUF=auto (default): GGUF when llama.cpp is installed; otherwise the Hugging Face and .pth exports only, one
#             line says how to add GGUF (pip install -r requirements-gguf.txt; docs/export.md), exit status 0
#   GGUF=1    GGUF too, or a clear error before anything is written
#   GGUF=0    no GGUF
#
# Runs under any POSIX sh (dash, bash); PYTHON picks the interpreter (default python3). yak/pipeline.py runs
# the steps; verbose=1 logs each merged tensor (merge_lora_low_mem.py --verbose).
set -a  # every variable below is exported to the pipeline
cd "$(dirname "$0")" || exit 2

base_model=${base_model:-models/stories260K}          # e.g. /models/llama-2-7b-hf
# applied in this order: stage-1 embeddings, CPT (stage 2) adapter, SFT adapter (comma-separated); empty:
# the finished ones of output/pt/stage1, output/pt/stage2 and output/sft, where run_pt.sh and run_sft.sh write
lora_model=${lora_model:-}
output_dir=${output_dir:-output/merged-hf}            # Hugging Face format (served by default: serve_demo.py)
pth_dir=${pth_dir-output/merged-pth}                  # Meta's consolidated.NN.pth layout; empty: none
output_dtype=${output_dtype:-float16}
GGUF=${GGUF:-auto}                                    # auto, 1 or 0 (above)
gguf_dir=${gguf_dir:-output/merged-gguf}
quant_types=${quant_types:-q4_0}
# a llama.cpp checkout; empty: the converter of the pinned llama-cpp-python sources (docs/export.md)
llama_cpp_dir=${llama_cpp_dir:-}
check_file=${check_file:-data/heldout/bo_modern_nanhai_deseg_heldout.txt}   # llama.cpp tokenizes as HF
verbose=${verbose:-0}

PYTHON=${PYTHON:-$(command -v python3 || command -v python || echo python3)}
exec "$PYTHON" -m yak.pipeline merge-export "$@"

# Chat with llama.cpp (a llama.cpp build), or llama-cpp-python's server (pip install 'llama-cpp-python[server]'):
#   llama-cli -m output/merged-gguf/merged-hf-q4_0.gguf -cnv --chat-template llama2
#   python3 -m llama_cpp.server --model output/merged-gguf/merged-hf-q4_0.gguf --host 127.0.0.1
