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
log=$(mktemp)
pip_install() {  # quiet on success, the whole log on failure
  if ! .venv/bin/python -m pip install "$@" >"$log" 2>&1; then
    grep -v "is ignored: it is neither a file nor a directory" "$log" >&2
    echo "bootstrap: pip install $* failed" >&2
    exit 1
  fi
}
pip_install --upgrade pip
pip_install torch==2.14.1 torchvision==0.29.1
pip_install -e ".[test]"
# HPSv2's reference package, for the cross-check test only: --no-deps (it pins protobuf<4 and pytest 7); clint is
# the one import of its own that it needs.
pip_install --no-deps hpsv2x==1.2.0 clint==0.5.1 args==0.1.0
# bitsandbytes (the `memory` extra, distill.optimizer: adamw8bit) beside the venv, not in it: installed, peft would
# import it in every process that injects a LoRA (~5 s each); its test puts this folder on sys.path itself.
pip_install --no-deps --target .venv/extras/bitsandbytes bitsandbytes==0.50.2
# torchao (the `memory` extra, distill.base_quantization) beside it for the same reason: installed, peft imports it
# (through transformers' torchao quantizer) in every process that imports peft (~3 s each); tests/conftest.py puts
# this folder on sys.path before diffusers is imported (diffusers checks for torchao once, at import).
pip_install --no-deps --target .venv/extras/torchao torchao==0.18.0
rm -f "$log"
# Fail loudly (and leave no stamp) if anything did not install.
.venv/bin/python -c "import tdm, torch, torchvision, diffusers, transformers, accelerate, peft, safetensors, sklearn, \
scipy, open_clip, pydantic, yaml, tqdm, PIL, huggingface_hub, sentencepiece, av, pytest, hypothesis, \
prefect, mlflow, dvc, torchmetrics, torch_fidelity, xdist, hpsv2.src.open_clip"
echo "$want" > "$stamp"
