#!/usr/bin/env bash
# Create .venv-tl4/: grokpipe beside TransformerLens 4.x (TransformerBridge), pinned by
# constraints-tl4.txt, to check that runs trained in .venv/ (TL 3.9) load under TL 4 too.
# Idempotent like scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV=".venv-tl4"
STAMP="$VENV/.grokpipe-setup"
want="$(cat pyproject.toml constraints-tl4.txt | sha256sum | cut -d' ' -f1)"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
    exit 0
fi
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -c constraints-tl4.txt "torch==2.13.0"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -c constraints-tl4.txt -e ".[test]"
echo "$want" > "$STAMP"
echo "grokpipe with TransformerLens 4 installed in $VENV"
