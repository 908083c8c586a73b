#!/usr/bin/env bash
# The test suite (tiny models, offline, one thread).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
source scripts/env.sh
python -m pytest "$@"
