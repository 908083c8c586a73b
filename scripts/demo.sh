#!/usr/bin/env bash
# The main job on the embedded default: train the digits teacher, TDM-distil it into a 4-step student,
# then sample both and score them (FID vs the held-out digits, class accuracy). ~17 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
source scripts/env.sh
tdm teacher-ft "$@"
tdm distill
mkdir -p outputs/demo
tdm sample -q --model outputs/teacher_ft/model --steps 50 --guidance 1.5 --n 1000 \
  --out outputs/demo/teacher_50steps.npz --score > outputs/demo/teacher_50steps.json
tdm sample -q --model outputs/distill/student --student --steps 4 --n 1000 \
  --out outputs/demo/student_4steps.npz --score > outputs/demo/student_4steps.json
python - <<'PY'
import json
for name in ("teacher_50steps", "student_4steps"):
    r = json.load(open(f"outputs/demo/{name}.json"))
    print(f"{name:16s} FID {r['fid']:6.2f}  class accuracy {r['accuracy']:.3f}  (real-vs-real floor {r['fid_floor']:.2f})")
PY
echo "demo: models in outputs/teacher_ft/model and outputs/distill/student, grids in outputs/demo/*.png" >&2
