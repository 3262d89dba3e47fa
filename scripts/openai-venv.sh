#!/usr/bin/env bash
# A Python virtual environment with the `openai` package from PyPI (the real third-party
# client the server is tested against), made once. Prints the path of its python.
# Override the folder with BSA_VENV_CACHE.
set -euo pipefail
dir="${BSA_VENV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/bsa/venv-openai}"
version="3.57.0"
if ! "$dir/bin/python" -c "import openai, sys; sys.exit(openai.__version__ != '$version')" 2>/dev/null; then
    echo "installing the openai package ($version, PyPI) into $dir" >&2
    rm -rf "$dir"
    python3 -m venv "$dir" >&2
    "$dir/bin/python" -m pip install --quiet --disable-pip-version-check "openai==$version" >&2
fi
echo "$dir/bin/python"
