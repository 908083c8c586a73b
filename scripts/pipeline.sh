#!/usr/bin/env bash
# The whole pipeline in one command, on a fresh clone: install (.venv/), start the local Prefect and MLflow
# servers and the deployments (scripts/servers.sh), run the deployment tdm/full-pipeline on the embedded default,
# printing its log as it goes (each stage's output and progress: n/total, losses, ETA), and print where to look.
# Arguments are overrides: section.key=value ...
#   bash scripts/pipeline.sh                      # the embedded default (digits, CPU, ~25 min on 2 cores)
#   bash scripts/pipeline.sh distill.k=2          # an override, validated before anything runs
# The servers keep running afterwards (UIs stay browsable): `bash scripts/servers.sh stop` stops them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
source scripts/env.sh
export PREFECT_API_URL=http://127.0.0.1:${TDM_PREFECT_PORT:-4200}/api
MLFLOW_UI=http://127.0.0.1:${TDM_MLFLOW_PORT:-5000}
bash scripts/servers.sh start
params=$(python -c 'import json, sys; print(json.dumps({"overrides": sys.argv[1:]}))' "$@")
t0=$(date +%s)
status=0
# The run's log as it goes (each stage's progress lines: n/total, losses, ETA), not only its state.
python flows/pipeline.py --deployment tdm/full-pipeline --params "$params" || status=$?
t1=$(date +%s)
echo
echo "full-pipeline $([ $status -eq 0 ] && echo completed || echo FAILED) in $(( (t1 - t0) / 60 )) min $(( (t1 - t0) % 60 )) s"
echo "  report      $(pwd)/outputs/report/index.html"
echo "  Prefect UI  ${PREFECT_API_URL%/api}/runs"
echo "  MLflow UI   $MLFLOW_UI  (experiment 'tdm': a pipeline run with a child run per stage)"
echo "  metrics     dvc metrics show;  dvc repro is now a no-op"
echo "  stop        bash scripts/servers.sh stop"
exit $status
