# Sourced by the scripts: offline hub, telemetry off, one torch thread per process on CPU.
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
export DO_NOT_TRACK=true PREFECT_SERVER_ANALYTICS_ENABLED=false MLFLOW_DISABLE_TELEMETRY=true DVC_NO_ANALYTICS=1
export TDM_NUM_THREADS=${TDM_NUM_THREADS:-1}
export PATH="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.venv/bin:$PATH"
export MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT=true
