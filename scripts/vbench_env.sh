#!/usr/bin/env bash
# Build .venv-vbench/: VBench in a virtual environment of its own, unless it is already current.
# VBench 0.1.5 pins transformers 4.33 and numpy<2, which clash with the project's; tdm drives it as a
# subprocess (tdm/evaluation/vbench.py). torch/torchvision are pinned to the pair that installs from the
# local files and imports on CPU (PyPI's 0.28.0 fails beside torch 2.13.0+cpu: `torchvision::nms does not
# exist`); unpinned, pip would fetch a multi-GB CUDA build. setuptools<81 keeps pkg_resources, which VBench
# imports. Set TDM_VBENCH_VENV to build elsewhere. Exits 0 without building when the registry is unreachable
# only if TDM_VBENCH_OPTIONAL=1 (the tests that need the venv then skip and say why).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
venv=${TDM_VBENCH_VENV:-.venv-vbench}
stamp=$venv/.tdm-vbench-stamp
want=$(sha256sum scripts/vbench_env.sh | cut -c1-16)
if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "vbench_env: installing VBench into $venv/ (first run: a few minutes)" >&2
rm -rf "$venv"
"$PY" -m venv "$venv"
log=$(mktemp)
if ! "$venv/bin/python" -m pip install torch==2.14.1 torchvision==0.29.1 vbench==0.1.5 "setuptools<81" >"$log" 2>&1; then
  grep -v "is ignored: it is neither a file nor a directory" "$log" >&2
  rm -rf "$venv" "$log"
  if [ "${TDM_VBENCH_OPTIONAL:-0}" = 1 ]; then
    echo "vbench_env: pip install failed; VBench tests will skip" >&2
    exit 0
  fi
  echo "vbench_env: pip install failed" >&2
  exit 1
fi
rm -f "$log"
# Fail loudly (and leave no stamp) if VBench does not import.
"$venv/bin/python" -c "import torch, torchvision, vbench; from vbench import VBench"
echo "$want" > "$stamp"
