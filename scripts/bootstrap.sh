#!/usr/bin/env bash
# Create .venv/ at the repository root and install tdm into it, unless it is already current.
# torch/torchvision come first, pinned, so pip takes the local wheels instead of a multi-GB download.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.tdm-install-stamp
want=$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16)
if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "bootstrap: installing tdm into .venv/ (first run: ~2-3 minutes)" >&2
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" >&2 || true
.venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1 2>&1 | grep -v "is ignored" >&2 || true
.venv/bin/python -m pip install -q -e ".[test]" 2>&1 | grep -v "is ignored" >&2 || true
.venv/bin/python -c "import tdm, torch, torchvision, diffusers, transformers" # fail loudly if anything is missing
echo "$want" > "$stamp"
