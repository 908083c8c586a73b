"""Distillation across processes: SIGKILL mid-run then resume (bitwise), and two gloo processes."""
import json
import os
import signal
import subprocess
import sys
import time

import torch

from tdm import checkpoint as ckpt

TINY = ["distill.batch_size=8", "distill.iterations=4", "distill.log_every=2", "distill.checkpoint_every=2",
        "distill.eval_samples=0", "distill.fake_lr=1e-3", "distill.lr=2e-4"]


def _distill_cmd(teacher_dir, iterations, every):
    return [sys.executable, "-m", "tdm.cli", "distill", "-q", "-S", f"distill.teacher={teacher_dir}",
            *[a for o in TINY for a in ("-S", o)], "-S", f"distill.iterations={iterations}",
            "-S", f"distill.checkpoint_every={every}", "-S", "distill.log_every=1"]


def test_sigkill_and_resume_is_bitwise_identical(teacher_dir, tmp_path):
    """A run killed with SIGKILL mid-way and resumed ends bitwise identical to an uninterrupted run."""
    env = {**os.environ, "TDM_NUM_THREADS": "1"}
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    cmd = _distill_cmd(teacher_dir, 40, 4)
    subprocess.run(cmd, cwd=tmp_path / "a", env=env, check=True, capture_output=True, timeout=300)
    proc = subprocess.Popen(cmd, cwd=tmp_path / "b", env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    root_b = tmp_path / "b/outputs/distill/checkpoints"
    deadline = time.time() + 240
    while ckpt.latest_checkpoint(root_b) is None or ckpt.latest_checkpoint(root_b).name < "step-0000008":
        assert proc.poll() is None and time.time() < deadline, "run ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = ckpt.latest_checkpoint(root_b).name
    assert killed_at < "step-0000040"
    subprocess.run(cmd, cwd=tmp_path / "b", env=env, check=True, capture_output=True, timeout=300)
    a = ckpt.load_state(ckpt.latest_checkpoint(tmp_path / "a/outputs/distill/checkpoints"))
    b = ckpt.load_state(ckpt.latest_checkpoint(root_b))
    assert a["step"] == b["step"] == 40
    for part in ("student", "fake"):
        for name, tensor in a["trainer"][part].items():
            assert torch.equal(tensor, b["trainer"][part][name]), (part, name)
    for name, tensor in a["trainer"]["ema"]["shadow"].items():
        assert torch.equal(tensor, b["trainer"]["ema"]["shadow"][name])
    log_a = (tmp_path / "a/outputs/distill/metrics.jsonl").read_text()
    assert log_a == (tmp_path / "b/outputs/distill/metrics.jsonl").read_text()


def test_two_processes_keep_identical_replicas(teacher_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TDM_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
           *_distill_cmd(teacher_dir, 4, 2)[1:], "-S", "distill.mode=lora"]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]  # distill checks a weight signature across ranks at each checkpoint
    assert json.loads((tmp_path / "metrics/distill.json").read_text())["iterations"] == 4
