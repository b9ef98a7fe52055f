#!/usr/bin/env bash
# TransformerLens 4 loading checks (CI runs them after the main suite): runs trained, converted and
# exported in .venv/ (TL 3.9) with HookedTransformer's logits and activations as references, then
# tests/tl4/ under .venv-tl4/ (TL 4.x, made by scripts/setup-tl4.sh) loads them as TransformerBridges.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup-tl4.sh
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
.venv/bin/python tests/tl4/make_reference.py "$work/reference"
GROKPIPE_TL4_REFERENCE="$work/reference" .venv-tl4/bin/python -m pytest -q -p no:cacheprovider tests/tl4
