#!/usr/bin/env bash
# Create .venv-tl4/: grokpipe beside TransformerLens 4.x (TransformerBridge), pinned by
# constraints-tl4.txt, to check that runs trained in .venv/ (TL 3.9) load under TL 4 too.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-tl4 CONSTRAINTS=constraints-tl4.txt exec bash scripts/setup.sh
