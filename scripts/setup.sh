#!/usr/bin/env bash
# Create .venv/ and install grokpipe with every dependency pinned (pyproject.toml + constraints.txt).
# Idempotent: a second run with unchanged pins returns in a second.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV=".venv"
STAMP="$VENV/.grokpipe-setup"
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
    exit 0
fi
"$PYTHON" -c 'import sys; assert sys.version_info[:2] >= (3, 11), "grokpipe needs Python >= 3.11"'
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
# torch first and alone: its pin must take the CPU wheel, never a CUDA build pulled in by a range.
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -c constraints.txt "torch==2.13.0"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[test]"
echo "$want" > "$STAMP"
echo "grokpipe installed in $VENV"
