#!/usr/bin/env bash
# The README's test command: everything the tests need, then the tests.
# Works from a fresh clone; reads the real benchmark from ../shared/bsa/dataset.csv when present.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --locked "$@"
