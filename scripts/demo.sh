#!/usr/bin/env bash
# The README's main command. For now: validate the sample data and score the judged
# sample run that ships in data/sample-run (illustrative labels), in a copy under runs/.
set -euo pipefail
cd "$(dirname "$0")/.."
bsa() { cargo run --release --quiet --locked -- "$@"; }
run=runs/sample-demo
if [ ! -f "$run/manifest.json" ]; then
    mkdir -p runs
    cp -r data/sample-run "$run"
fi
bsa data stats data/sample.csv
bsa score "$run"
[ -f "$run/official.csv" ] || bsa export "$run" --official-csv "$run/official.csv"
echo "run directory: $run (scores.json, official.csv)"
