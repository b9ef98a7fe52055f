#!/usr/bin/env bash
# Create .venv/ and install grokpipe with every dependency pinned (pyproject.toml + constraints.txt).
# Idempotent: a second run with unchanged pins returns in a second. VENV and CONSTRAINTS choose
# another environment (scripts/setup-tl4.sh: .venv-tl4/ with constraints-tl4.txt).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
CONSTRAINTS="${CONSTRAINTS:-constraints.txt}"
STAMP="$VENV/.grokpipe-setup"
want="$(cat pyproject.toml "$CONSTRAINTS" | sha256sum | cut -d' ' -f1)"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
    exit 0
fi
"$PYTHON" -c 'import sys; assert sys.version_info[:2] >= (3, 11), "grokpipe needs Python >= 3.11"'
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
# torch first and alone: its pin must take the CPU wheel, never a CUDA build pulled in by a range.
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -c "$CONSTRAINTS" "torch==2.13.0"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -c "$CONSTRAINTS" -e ".[test]"
echo "$want" > "$STAMP"
echo "grokpipe installed in $VENV"
