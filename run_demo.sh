#!/bin/sh
# The whole pipeline on the shipped tiny model (stories260K) and the shipped Tibetan/English/Chinese sample, on
# a CPU, in a few minutes: merged tokenizer -> stage 1 (embeddings) -> stage 2 (LoRA+) -> SFT -> low-memory
# merge -> GGUF for llama.cpp (when llama-cpp-python is installed) -> evaluation before/after -> one Tibetan
# query through serve_demo.py. Every artifact goes under $OUT, which appears only when every step succeeded
# (the run writes to a hidden folder beside it; an interrupted run removes that, a failed one keeps it to read).
#
#   sh run_demo.sh                      # writes outputs/demo (refuses to overwrite an existing one)
#   OUT=/tmp/demo sh run_demo.sh
#
# The same scripts, with a Llama 2 checkpoint and GPUs, are the real recipe: see README.md. Runs under any
# POSIX sh (dash, bash); PYTHON picks the interpreter (default python3).
set -eu
if [ "${1:-}" = "--help" ] || [ "${1:-}" = "-h" ]; then  # the comment block above is the help
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
  exit 0
fi
cd "$(dirname "$0")"

OUT=${OUT:-outputs/demo}
BASE=models/stories260K
PYTHON=${PYTHON:-$(command -v python3 || command -v python || echo python3)}
export PYTHON
EVAL_DATA=${EVAL_DATA:-../shared/data/eval}   # the public evaluation sets, if present (docs/evaluation.md)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # the tiny model is fastest on one thread per process

if [ -e "$OUT" ]; then
  echo "error: $OUT already exists; remove it or choose another folder with OUT=... (README.md, Quick start)" >&2
  exit 2
fi
WORK="$(dirname "$OUT")/.$(basename "$OUT").incomplete-$$"  # renamed to $OUT once every step succeeded
mkdir -p "$WORK"
SERVER=
finish() {
  status=$?
  if [ -n "$SERVER" ]; then kill "$SERVER" 2>/dev/null || true; fi
  if [ -d "$WORK" ] && [ "$status" -ge 128 ]; then  # interrupted (Ctrl-C, kill)
    rm -rf "$WORK"
    echo "interrupted: nothing was written to $OUT" >&2
  elif [ -d "$WORK" ]; then
    echo "error: $OUT was not written; the output so far is in $WORK (remove it when done)" >&2
  fi
}
trap finish EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
START=$(date +%s)
step() { printf '\n=== [%s] %s (%ss)\n' "$1" "$2" "$(( $(date +%s) - START ))"; }

step 1/7 "merged tokenizer: stories260K's 512 pieces + 3,000 Tibetan BPE pieces learnt from data/pt/bo"
"$PYTHON" merge_tokenizer.py --corpus data/pt/bo --base_tokenizer "$BASE" --num_pieces 3000 \
  --output_dir "$WORK/tokenizer"

step 2/7 "continued pretraining: stage 1 (embeddings only), then stage 2 (LoRA+ and embeddings)"
BASE=$BASE TOKENIZER="$WORK/tokenizer/merged_tokenizer_hf" OUT="$WORK/pt" CACHE="$WORK/data_cache" \
  SAVE_STEPS=1000 sh run_pt.sh --logging_steps 2

step 3/7 "instruction tuning (SFT) on data/sft, on top of stage 1 + stage 2"
BASE=$BASE ADAPTERS="$WORK/pt/stage1 $WORK/pt/stage2" OUT="$WORK/sft" CACHE="$WORK/data_cache" EPOCHS=1 \
  SAVE_STEPS=1000 sh run_sft.sh --logging_steps 2

step 4/7 "low-memory merge (base + stage 1 + stage 2 + SFT -> one Hugging Face model), then GGUF f16 and q4_0 \
for llama.cpp when it is installed, checking that llama.cpp tokenizes Tibetan exactly as Hugging Face"
base_model=$BASE lora_model="$WORK/pt/stage1,$WORK/pt/stage2,$WORK/sft" output_dir="$WORK/merged" pth_dir= \
  output_dtype=auto gguf_dir="$WORK/gguf" sh run_merge_export.sh

step 5/7 "evaluation, before (base) and after (merged)"
TASKS="heldout tokenizer"
if [ -d "$EVAL_DATA" ]; then TASKS="$TASKS tncc tusa ti_mmlu bo_en"; fi
# shellcheck disable=SC2086  # TASKS is a list of words
"$PYTHON" evaluate.py --models "base=$BASE" "yak=$WORK/merged" --tasks $TASKS --data_root "$EVAL_DATA" \
  --limit 40 --lm_max_bytes 30000 --max_new_tokens 24 --output_dir "$WORK/eval"

step 6/7 "serving: serve_demo.py on a free local port (--port 0), one Tibetan query to POST /api/chat"
"$PYTHON" serve_demo.py --base_model "$WORK/merged" --port 0 > "$WORK/server.log" 2>&1 &
SERVER=$!
"$PYTHON" - "$WORK/server.log" "$WORK/chat.json" <<'PY'
import json, re, sys, time, urllib.request

log, out = sys.argv[1], sys.argv[2]
for _ in range(480):  # the server loads the model, then prints the address it serves on
    found = re.search(r"serving \S+ on (http://\S+/)", open(log, encoding="utf-8").read())
    if found:
        base = found[1].rstrip("/")
        break
    time.sleep(0.25)
else:
    sys.exit("the server did not come up; see server.log")
# a real Tibetan sentence: the first one of the held-out modern text
line = open("data/heldout/bo_modern_nanhai_deseg_heldout.txt", encoding="utf-8").readline()
query = line.split("།")[0] + "།"
req = urllib.request.Request(f"{base}/api/chat", data=json.dumps(
    {"query": query, "max_new_tokens": 48, "temperature": 0}).encode(), headers={"Content-Type": "application/json"})
answer = json.load(urllib.request.urlopen(req, timeout=120))
json.dump(answer, open(out, "w", encoding="utf-8"), ensure_ascii=False, indent=1)
shown = answer["output"] or "(empty: the tiny model ended its answer at once)"
print(f"query:  {answer['query']}\nanswer: {shown}")
PY
kill $SERVER; wait $SERVER 2>/dev/null || true; SERVER=

step 7/7 "summary"
if [ -e "$OUT" ]; then
  echo "error: $OUT appeared while the demo ran" >&2
  exit 2
fi
mv "$WORK" "$OUT"
cat "$OUT/eval/results.md"
cat <<EOF

Done in $(( $(date +%s) - START )) s. Everything is under $OUT:
  tokenizer/merged_tokenizer_hf   the merged tokenizer (compare tokenizers with tokenizer_report.py)
  pt/stage1, pt/stage2            continued-pretraining outputs, with loss curves pt/stage*/loss.png
  sft                             the SFT adapter, loss curve sft/loss.png
  merged                          the merged model (Hugging Face format; merge_lora_low_mem.py --output_type pth for Meta's)
  gguf                            llama.cpp files (f16, q4_0), when llama-cpp-python is installed
  eval/results.{md,json,png}      the evaluation table and chart, base vs merged
  chat.json, server.log           the served answer to a Tibetan query
EOF
