#!/usr/bin/env bash
# Every GPU check and GPU benchmark of the toolkit in one command, on one machine, with one log per job.
#
#   bash bench/gpu_checks.sh                 # LOGS=gpu_checks; uses every visible GPU
#
# With one GPU the jobs run one after another; with four or more, the independent one-GPU jobs run side by
# side (one GPU each), then the DeepSpeed scaling runs use 1, 2 and all GPUs. Jobs:
#   gputests   python -m pytest -m gpu (training, generation)          then run_pt.sh on the tiny model, 1 GPU
#   train      bench/train_throughput.py: naive vs project, stage 2 and 1, 7B shape (with Liger if installed)
#   13b        stage 2 of a 13B shape on one card (with and without gradient checkpointing)
#   decode     bench/decode_throughput.py: generate() vs the engine vs the server
#   z2_N       DeepSpeed ZeRO-2 over N GPUs (per-GPU tokens/s, to compare with z2_1)
#   z3_13b     DeepSpeed ZeRO-3, 13B shape over 2 GPUs;  runpt_2: run_pt.sh on 2 GPUs
# At the end it prints every RESULT line and the test summaries. Needs the packages of requirements.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
LOGS=${LOGS:-gpu_checks}
mkdir -p "$LOGS"
GPUS=$(python3 -c "import torch; print(torch.cuda.device_count())")
[ "$GPUS" -ge 1 ] || { echo "bench/gpu_checks.sh: no CUDA GPU visible" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total --format=csv > "$LOGS/gpus.txt"
export PYTHONUNBUFFERED=1
LIGER=$(python3 -c "import liger_kernel" 2>/dev/null && echo --liger)
TINY_RUN=(DEVICE=gpu STAGE1_TOKENS=400000 STAGE2_TOKENS=400000 WARMUP_STEPS=5 SAVE_STEPS=50)

job() {  # job NAME GPU_LIST COMMAND...: run on those GPUs, log to $LOGS/NAME.log
  local name=$1 gpus=$2; shift 2
  echo "$(date +%T) start $name on GPU $gpus"
  CUDA_VISIBLE_DEVICES=$gpus "$@" > "$LOGS/$name.log" 2>&1
  echo "$(date +%T) end $name (exit $?)" | tee -a "$LOGS/$name.log"
}
gpu() { [ "$GPUS" -ge 4 ] && echo "$1" || echo 0; }  # the GPU of a one-GPU job
side() { if [ "$GPUS" -ge 4 ]; then "$@" & else "$@"; fi; }  # side by side when there are GPUs for it

side job gputests "$(gpu 1)" bash -c "python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_training.py \
  tests/test_generation.py && env ${TINY_RUN[*]} GPUS=1 OUT=$LOGS/pt1 CACHE=$LOGS/cache MASTER_PORT=29611 bash run_pt.sh"
side job train "$(gpu 0)" python3 bench/train_throughput.py --project_batch 4 6 $LIGER --profile
side job 13b "$(gpu 2)" bash -c "python3 bench/train_throughput.py --stages 2 --shape 13b --skip_naive \
  --project_batch 2 4 --ckpt && python3 bench/train_throughput.py --stages 2 --shape 13b --skip_naive --project_batch 1"
side job decode "$(gpu 3)" python3 bench/decode_throughput.py
wait

if [ "$GPUS" -ge 2 ]; then
  z2=(bench/train_throughput.py --stages 2 --skip_naive --deepspeed ds_z2_config.json)
  job z2_1 0 torchrun --nproc_per_node 1 --master_port 29701 "${z2[@]}"
  job z2_2 0,1 torchrun --nproc_per_node 2 --master_port 29702 "${z2[@]}"
  [ "$GPUS" -gt 2 ] && job "z2_$GPUS" "$(seq -s, 0 $((GPUS - 1)))" \
    torchrun --nproc_per_node "$GPUS" --master_port 29703 "${z2[@]}"
  job z3_13b 0,1 torchrun --nproc_per_node 2 --master_port 29704 bench/train_throughput.py --stages 2 \
    --shape 13b --skip_naive --deepspeed ds_z3_config.json --ckpt --no_compile --project_batch 2
  job runpt_2 0,1 env "${TINY_RUN[@]}" GPUS=2 OUT="$LOGS/pt2" CACHE="$LOGS/cache" MASTER_PORT=29612 bash run_pt.sh
fi

echo; grep -h "^RESULT\|^PROFILE\| passed\| failed\|exit [0-9]" "$LOGS"/*.log
