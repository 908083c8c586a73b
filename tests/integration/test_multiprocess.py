"""Two CPU processes (gloo DDP through accelerate) train one teacher: the replicas must stay identical
(train() checks a weight signature across ranks at every checkpoint) and only rank 0 writes outputs."""
import json
import os
import shutil
import subprocess
import sys

from conftest import PARAMS


def test_two_process_teacher_ft(tmp_path):
    shutil.copy(PARAMS, tmp_path / "params.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TDM_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "tdm.cli", "teacher-ft", "-q", "-S", "model.channels=[32, 32]", "-S", "teacher_ft.steps=4",
           "-S", "teacher_ft.batch_size=8", "-S", "teacher_ft.checkpoint_every=2", "-S", "teacher_ft.eval_samples=0"]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics/teacher_ft.json").read_text())
    assert metrics["steps"] == 4
    assert (tmp_path / "outputs/teacher_ft/model/model_index.json").is_file()
    rows = (tmp_path / "outputs/teacher_ft/metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [1, 2, 3, 4]  # written by rank 0 only
