#!/usr/bin/env bash
# Every GPU check and GPU benchmark of the toolkit in one command, one log per job and a summary at the end.
#
#   bash bench/gpu_checks.sh                            # every job, on every visible GPU (LOGS=gpu_checks)
#   JOBS="preflight +gputests +runpt 13b wait train1" bash bench/gpu_checks.sh   # '+': in the background
#   REHEARSAL=1 bash bench/gpu_checks.sh                # the CPU rehearsal: each job's code path at toy size
#
# Jobs (one GPU each unless said; JOBS runs them in the order given, a '+' job in the background beside the
# jobs after it; 'wait' waits for the background jobs so far, as does the end):
#   preflight  bench/check_env.py: versions, carried wheels' requirements, the GPU
#   gputests   python -m pytest -m gpu over every test file with gpu-marked tests
#   runpt      run_pt.sh DEVICE=gpu on the tiny model, both stages; then again, killed mid-stage 2 and started
#              again: it must resume and finish at the same step (its last loss is compared with the first run's)
#   loss_paths bench/loss_paths.py: fast vs plain path losses over 50 steps, and the noise (issue 15)
#   serve      bench/serve_latency.py: serve_demo.py on the GPU (tiny model), 1 and 16 clients
#   13b        bench/train_throughput.py: stage 2 of a 13B shape on one card (batch 2 and 4 with gradient
#              checkpointing, batch 1 without)
#   train2     bench/train_throughput.py stage 2, 7B shape, block 1024: naive vs project (batch 4, 6; with
#              Liger's fused linear cross-entropy at 6, 8), profiled
#   train1     the same, stage 1 (naive vs project batch 8), profiled
#   decode     bench/decode_throughput.py: generate() vs the engine vs the server (16 clients)
#   z2 z3_13b runpt2   with 2 or more GPUs only: DeepSpeed ZeRO-2 over 1, 2 and all GPUs; ZeRO-3 13B over 2;
#                      run_pt.sh on 2 GPUs
# Default JOBS: every one-GPU job above (and the multi-GPU ones when there are GPUs for them).
#
# Variables: LOGS (job logs and summary.txt; default $OUT where the device tool sets it, else gpu_checks/),
# WORK (run outputs, caches; default a temporary folder), T_<job> (a job's time limit in seconds; defaults
# below), BUDGET (seconds for the whole command: a job's limit is cut to what is left, and a job that would get
# under 30 s is skipped), REHEARSAL=1 (no GPU needed: toy sizes, 3 steps; figures meaningless).
# With the device tool only 8 files come back: keep to 7 jobs a call (each writes LOGS/<job>.log).
# Exit status: 0 when every job ended with 0, else 1.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export PYTHONUNBUFFERED=1
REHEARSAL=${REHEARSAL:-0}
LOGS=${LOGS:-${OUT:-gpu_checks}}
WORK=${WORK:-$(mktemp -d /tmp/gpu_checks.XXXXXX)}
mkdir -p "$LOGS" "$WORK"
LOGS=$(cd "$LOGS" && pwd) WORK=$(cd "$WORK" && pwd)
export LOGS WORK REHEARSAL
R() { [ "$REHEARSAL" = 1 ]; }  # rehearsal?
tree() { local c; echo "$1"; for c in $(pgrep -P "$1"); do tree "$c"; done; }  # a process, then its descendants
# End a process and all its descendants at once, parents first (none can react to a child's end). Not by process
# group: torchrun starts its workers in sessions of their own, so a killed group would leave them training.
kill_tree() { kill -KILL $(tree "$1") 2>/dev/null; }

# ---------------------------------------------------------------------------------------------- the jobs
# Each job is a function run in a fresh bash (bash gpu_checks.sh --job NAME), so that a time limit ends the
# whole job (its process tree: torchrun workers, servers) and nothing else.
tb() {  # bench/train_throughput.py, at toy size in the rehearsal
  if R; then python3 bench/train_throughput.py "$@" --shape toy --block 32 --steps 2 --warmup 1 \
      --naive_batch 2 --stage1_batch 2
  else python3 bench/train_throughput.py "$@"; fi
}
job_preflight() { python3 bench/check_env.py $(R || echo --gpu); }
job_gputests() {
  python3 -m pytest -q -p no:cacheprovider -m gpu $(grep -l "mark.gpu" tests/test_*.py)
}
pt_vars() {  # run_pt.sh's settings for the tiny runs
  if R; then echo GPUS=1 DEVICE=cpu STAGE1_TOKENS=6144 STAGE2_TOKENS=6144 BLOCK_SIZE=64 BATCH=4 GRAD_ACC=2 \
      WARMUP_STEPS=2 LOGGING_STEPS=1
  else echo GPUS=1 DEVICE=gpu STAGE1_TOKENS=400000 STAGE2_TOKENS=400000 WARMUP_STEPS=5 LOGGING_STEPS=1; fi
}
job_runpt() {
  local first=$WORK/pt resumed=$WORK/pt_resumed cache=$WORK/cache
  rm -rf "$first" "$resumed"
  echo "== run_pt.sh, both stages, uninterrupted"
  env $(pt_vars) SAVE_STEPS=50 OUT="$first" CACHE="$cache" bash run_pt.sh || return 1
  echo "== run_pt.sh again (stage 1 copied from the first run), killed once stage 2 has saved a checkpoint"
  mkdir -p "$resumed" && cp -r "$first/stage1" "$resumed/stage1"
  env $(pt_vars) SAVE_STEPS=2 OUT="$resumed" CACHE="$cache" bash run_pt.sh > "$WORK/killed.log" 2>&1 &
  local pid=$! waited=0
  until ls "$resumed"/stage2/checkpoint-*/yak_checkpoint.json >/dev/null 2>&1 || ! kill -0 "$pid" 2>/dev/null \
      || [ $waited -ge 3000 ]; do sleep 0.1; waited=$((waited + 1)); done
  kill_tree "$pid"
  wait "$pid" 2>/dev/null
  cat "$WORK/killed.log"
  [ -f "$resumed/stage2/yak_adapter.json" ] && { echo "FAILED: stage 2 finished before the kill"; return 1; }
  echo; echo "== killed with $(ls -d "$resumed"/stage2/checkpoint-* | xargs -n1 basename | tr '\n' ' ')in $resumed/stage2; started again"
  env $(pt_vars) SAVE_STEPS=2 OUT="$resumed" CACHE="$cache" bash run_pt.sh 2>&1 | tee "$WORK/resumed.log" || return 1
  grep -q "resuming from .*checkpoint-" "$WORK/resumed.log" || { echo "FAILED: it did not resume"; return 1; }
  python3 - "$first/stage2" "$resumed/stage2" <<'EOF'
import json, sys
from pathlib import Path
def last(folder):  # the newest checkpoint's trainer state: (global step, its logged losses by step)
    ckpt = max(Path(folder).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    state = json.loads((ckpt / "trainer_state.json").read_text())
    return state["global_step"], {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}
(n1, a), (n2, b) = last(sys.argv[1]), last(sys.argv[2])
common = sorted(set(a) & set(b))
diff = max(abs(a[s] - b[s]) / abs(a[s]) for s in common) if common else float("nan")
print(f"RESULT runpt resume: uninterrupted {n1} steps, killed and resumed {n2} steps; losses at steps "
      f"{common[0] if common else '-'}..{common[-1] if common else '-'}: largest relative difference {diff:.2%}")
sys.exit(0 if n1 == n2 else 1)
EOF
}
job_loss_paths() {
  if R; then python3 bench/loss_paths.py --steps 3 --work "$WORK/loss_paths"
  else python3 bench/loss_paths.py --steps 50 --work "$WORK/loss_paths"; fi
}
job_serve() {
  if R; then python3 bench/serve_latency.py --requests 2 --max_new_tokens 16
  else python3 bench/serve_latency.py --device gpu; fi
}
job_13b() {
  if R; then tb --stages 2 --skip_naive --project_batch 2 --ckpt
  else tb --stages 2 --shape 13b --skip_naive --project_batch 2 4 --ckpt \
    && tb --stages 2 --shape 13b --skip_naive --project_batch 1; fi
}
FLCE='{"rms_norm":false,"rope":false,"swiglu":false,"fused_linear_cross_entropy":true}'
job_train2() {
  if R; then tb --stages 2 --project_batch 2 --profile
  else tb --stages 2 --project_batch 4 6 --liger_batch 6 8 --liger_config "$FLCE" --profile; fi
}
job_train1() { tb --stages 1 --profile; }
job_decode() {  # compiled engine first: the one-stream target's figure comes before a time limit can cut the job
  python3 bench/decode_throughput.py --variants graphs+compile graphs $(R && echo --toy)
}
job_z2() {
  local z2=(bench/train_throughput.py --stages 2 --skip_naive --deepspeed ds_z2_config.json) n
  for n in 1 2 "$NGPUS"; do
    echo "== ZeRO-2 over $n GPU(s)"
    CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((n - 1))) torchrun --nproc_per_node "$n" --master_port $((29700 + n)) \
      "${z2[@]}" || return 1
    [ "$n" = "$NGPUS" ] && break
  done
}
job_z3_13b() {
  CUDA_VISIBLE_DEVICES=0,1 torchrun --nproc_per_node 2 --master_port 29704 bench/train_throughput.py --stages 2 \
    --shape 13b --skip_naive --deepspeed ds_z3_config.json --ckpt --no_compile --project_batch 2
}
job_runpt2() {
  CUDA_VISIBLE_DEVICES=0,1 env $(pt_vars) GPUS=2 OUT="$WORK/pt2" CACHE="$WORK/cache2" MASTER_PORT=29612 \
    bash run_pt.sh
}
# time limits (s): about twice what each took or is expected to take on one H100
if R; then  # the rehearsal on 2 shared CPU cores: compilation is slow there
  for j in preflight gputests runpt loss_paths serve 13b train2 train1 decode; do eval ": \"\${T_$j:=900}\""; done
fi
: "${T_preflight:=60}" "${T_gputests:=420}" "${T_runpt:=420}" "${T_loss_paths:=420}" "${T_serve:=180}"
: "${T_13b:=420}" "${T_train2:=480}" "${T_train1:=240}" "${T_decode:=540}" "${T_z2:=600}" "${T_z3_13b:=300}"
: "${T_runpt2:=300}"

if [ "${1:-}" = --job ]; then  # one job, in the process group that the runner made for it
  "job_$2"
  exit $?
fi

# ---------------------------------------------------------------------------------------------- the runner
if R; then NGPUS=0; else
  NGPUS=$(python3 -c "import torch; print(torch.cuda.device_count())")
  [ "$NGPUS" -ge 1 ] || { echo "bench/gpu_checks.sh: no CUDA GPU visible (REHEARSAL=1 runs on the CPU)" >&2; exit 2; }
fi
export NGPUS
ONE_GPU="preflight gputests runpt loss_paths serve 13b train2 train1 decode"
JOBS=${JOBS:-$ONE_GPU $( [ "$NGPUS" -ge 2 ] && echo z2 z3_13b runpt2)}
for j in $JOBS; do
  [ "$j" = wait ] || declare -F "job_${j#+}" >/dev/null || { echo "bench/gpu_checks.sh: unknown job '${j#+}' in JOBS (jobs: $ONE_GPU z2 z3_13b runpt2)" >&2; exit 2; }
done
START=$SECONDS
SUMMARY=$LOGS/summary.txt
echo "gpu_checks $(date -u +%FT%TZ): JOBS=$JOBS REHEARSAL=$REHEARSAL NGPUS=$NGPUS BUDGET=${BUDGET:-none} WORK=$WORK" > "$SUMMARY"

run_job() {  # run_job NAME: with its time limit, logged to LOGS/NAME.log; one line in the summary
  local name=$1 limit t0=$SECONDS rc status
  limit=$(eval echo "\${T_$name:-600}")
  if [ -n "${BUDGET:-}" ]; then
    local left=$((BUDGET - (SECONDS - START) - 15))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 30 ]; then
      echo "$(printf '%-10s' "$name") skipped (no time left in BUDGET=$BUDGET)" | tee -a "$SUMMARY"; return 0
    fi
  fi
  echo "$(date +%T) start $name (limit ${limit} s)"
  bash "$0" --job "$name" > "$LOGS/$name.log" 2>&1 < /dev/null &
  local pid=$!
  ( sleep "$limit" && kill -0 "$pid" && echo "TIMEOUT: ended after ${limit} s" >> "$LOGS/$name.log" \
    && kill_tree "$pid" ) 2>/dev/null &
  local watch=$!
  wait "$pid"; rc=$?
  kill_tree "$watch"; wait "$watch" 2>/dev/null
  if grep -q "^TIMEOUT: ended after" "$LOGS/$name.log"; then status="TIMEOUT after ${limit} s"; rc=124
  elif [ "$rc" -eq 0 ]; then status=ok; else status="FAILED (exit $rc)"; fi
  echo "$(printf '%-10s' "$name") $status, $((SECONDS - t0)) s" | tee -a "$SUMMARY"
  [ "$rc" -eq 0 ]
}

failed=0 pids=()
wait_background() { local p; for p in "${pids[@]}"; do wait "$p" || failed=1; done; pids=(); }
for j in $JOBS; do
  if [ "$j" = wait ]; then wait_background
  elif [ "${j#+}" != "$j" ]; then run_job "${j#+}" & pids+=($!)
  else run_job "$j" || failed=1; fi
done
wait_background

{
  echo
  for j in $JOBS; do
    [ "$j" != wait ] && [ -f "$LOGS/${j#+}.log" ] || continue
    grep -h "^RESULT\|^PROFILE\|^FAILED\|^| \|[0-9] passed\|[0-9] failed\|^ERROR\|^E  " "$LOGS/${j#+}.log" \
      | sed "s/^/${j#+}: /" | head -60
  done
  echo "total $((SECONDS - START)) s; $( [ $failed = 0 ] && echo 'every job ended with exit 0' || echo 'SOME JOBS FAILED')"
} >> "$SUMMARY"
echo; cat "$SUMMARY"
exit $failed
