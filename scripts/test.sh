#!/usr/bin/env bash
# The test suite (tiny models, offline, one thread). Builds .venv/ and, for the VBench tests, .venv-vbench/
# (VBench's own environment, ~3 min and 6.7 GB the first time; TDM_SKIP_VBENCH=1 skips it and those tests).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
if [ "${TDM_SKIP_VBENCH:-0}" != 1 ]; then
  TDM_VBENCH_OPTIONAL=1 bash scripts/vbench_env.sh
fi
source scripts/env.sh
# Test files spread over TDM_TEST_WORKERS processes (default 2, one torch thread each; pytest-xdist, whole files per
# worker so module fixtures build once); TDM_TEST_WORKERS=0 runs them in this process.
workers=${TDM_TEST_WORKERS:-2}
if [ "$workers" = 0 ]; then
  python -m pytest "$@"
else
  python -m pytest -n "$workers" --dist loadfile --durations=15 "$@"
fi
