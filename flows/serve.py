"""Serve the `tdm` flow's deployments from this process: `tdm/full-pipeline` and `tdm/ablation`.

    python flows/serve.py        # then: prefect deployment run tdm/full-pipeline --watch

`limit=1` runs one flow run at a time (two DVC processes in one project fail on DVC's lock instead of
waiting). Runs execute in subprocesses of this one, in the project directory, with this environment
(MLFLOW_TRACKING_URI, PATH). Stopping it does not pause the deployments, so queued runs start on restart.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline import DEFAULT_VARIANTS, PROJECT, check_prefect_server, tdm  # noqa: E402

from prefect import serve  # noqa: E402

if __name__ == "__main__":
    os.chdir(PROJECT)
    check_prefect_server()
    serve(
        tdm.to_deployment(name="full-pipeline", tags=["tdm"],
                          description="teacher_ft -> distill -> lora_transfer -> evaluate -> report (dvc repro)"),
        tdm.to_deployment(name="ablation", tags=["tdm"], parameters={"variants": DEFAULT_VARIANTS},
                          description="named variants (lists of section.key=value) as DVC experiments"),
        limit=1, pause_on_shutdown=False,
    )
