#!/usr/bin/env bash
# Every GPU check of issue 4 in one go, on the GPU machine, from the repository root, with
# the CUDA binary in dist-cuda/ (bsa or bsa.xz). Results: JSON (and summary.md) in $OUT.
# See scripts/gpu/README.md. Each step has its own time limit and a failing step does not
# stop the others; the exit status is 0 only if every step ran.
#
# Knobs: OUT (default out-gpu), BATCHES (default "16 64 256"), NEW_TOKENS (1024),
# SAMPLES (5), PROMPT_LEN (100), CKPT (checkpoint dir, default /tmp/bsa-ckpt),
# SKIP (step names to skip), DEADLINE (seconds for the whole run, default 560: steps
# are cut to fit and the summary always runs), PY (python with torch).
set -uo pipefail
OUT=${OUT:-out-gpu}
BATCHES=${BATCHES:-16 64 256}
NEW_TOKENS=${NEW_TOKENS:-1024}
SAMPLES=${SAMPLES:-5}
PROMPT_LEN=${PROMPT_LEN:-100}
CKPT=${CKPT:-/tmp/bsa-ckpt}
SKIP=${SKIP:-}
PY=${PY:-/opt/torch/.venv/bin/python3}
DEADLINE=${DEADLINE:-560}   # seconds for the whole script (a device command may run 600 s)
RESERVE=20                  # kept for the summary
[ -x "$PY" ] || PY=python3
export LD_LIBRARY_PATH=/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
mkdir -p "$OUT"
BSA=dist-cuda/bsa
[ -x "$BSA" ] || { [ -e "$BSA.xz" ] && xz -dkf "$BSA.xz" && chmod +x "$BSA"; }
failed=()
log() { printf '[check %s] %s\n' "$(date +%T)" "$*" | tee -a "$OUT/check.log" >&2; }
START=$(date +%s)
step() {  # step NAME SECONDS CMD... (the limit is cut to what is left of DEADLINE)
  local name=$1 limit=$2; shift 2
  case " $SKIP " in *" $name "*) log "$name: skipped"; return 0;; esac
  local left=$(( DEADLINE - ($(date +%s) - START) - RESERVE ))
  [ "$name" = summary ] && left=$(( left + RESERVE ))
  if [ $left -lt 15 ]; then log "$name: not run, DEADLINE reached"; failed+=("$name"); return 0; fi
  [ $left -lt $limit ] && limit=$left
  log "$name: start (limit ${limit}s)"
  local t=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.stdout" 2> "$OUT/$name.stderr"
  local rc=$?
  log "$name: rc $rc in $(( $(date +%s) - t ))s"
  [ $rc -eq 0 ] || { failed+=("$name"); tail -5 "$OUT/$name.stderr" >&2; }
}
# Peak GPU memory of a bsa run: nvidia-smi sampled every 100 ms in the background.
mem_watch() { while :; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits; sleep 0.1; done; }

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
step start 30 "$BSA" --help
step bandwidth 60 "$PY" scripts/gpu/bandwidth.py "$OUT/bandwidth.json"
step checkpoints 120 "$PY" scripts/gpu/make_checkpoints.py "$CKPT"
step parity 150 "$PY" scripts/gpu/parity.py "$BSA" "$CKPT" "$OUT/parity.json" qwen2-small qwen3-small llama-small qwen2.5-7b
step sampler_torch 60 "$PY" scripts/gpu/sampler_torch.py /tmp/bsa-logits.f32 "$OUT/sampler_torch.json" 256 152064
step sampler 120 "$BSA" bench sampler --device cuda --check --rows 256 --vocab 152064 --repeat 20 \
  --draws 20000 --chi-rows 2 --logits /tmp/bsa-logits.f32 --json "$OUT/sampler.json"
mem_watch > "$OUT/bsa_mem_samples.txt" 2>/dev/null & W=$!
step engine 200 "$BSA" bench engine --model "$CKPT/qwen2.5-7b" --device cuda --dtype bf16 \
  --batch-sizes "$(echo $BATCHES | tr ' ' ,)" --prompt-len "$PROMPT_LEN" --new-tokens "$NEW_TOKENS" \
  --samples "$SAMPLES" --json "$OUT/engine.json"
kill $W 2>/dev/null
sort -n "$OUT/bsa_mem_samples.txt" | tail -1 | awk '{print "{\"bsa_engine_peak_mib\": " $1 "}"}' > "$OUT/bsa_peak_mem.json"
[ -s "$OUT/engine.json" ] && step hf 200 "$PY" scripts/gpu/hf_generate.py "$CKPT/qwen2.5-7b" "$OUT/engine.json" "$OUT/hf_generate.json"
step summary 30 "$PY" scripts/gpu/summarize.py "$OUT" "$CKPT/qwen2.5-7b"
cat "$OUT/summary.md" 2>/dev/null
[ ${#failed[@]} -eq 0 ] || { log "failed steps: ${failed[*]}"; exit 1; }
