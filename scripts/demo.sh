#!/usr/bin/env bash
# The main job on the embedded default: train the digits teacher, then sample and score it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
source scripts/env.sh
tdm teacher-ft "$@"
tdm sample --model outputs/teacher_ft/model --steps 50 --n 100 --out outputs/demo/teacher_50steps.npz --score
echo "demo: teacher in outputs/teacher_ft/model, metrics in metrics/teacher_ft.json, samples in outputs/demo/" >&2
