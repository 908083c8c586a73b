"""Teacher training under two versions of the code, bitwise: a short run of `train` (tiny UNet, a checkpoint in
the middle) in an `--old` checkout (e.g. `git worktree add /tmp/old 3136ddf`) and in this one; the EMA weights and
the final loss must be identical. The full-length demo run is too long to repeat for every refactor; its
distillation and scoring are compared by benchmarks/compare_runs.py on the same teacher.

    python benchmarks/compare_teacher_training.py --old /tmp/old
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUN = """
import sys, torch
torch.set_num_threads(1)
from pathlib import Path
from tdm import config
from tdm.config import StagePaths
try:
    from tdm.teacher_ft import train
except ImportError:  # before the stage module was named after its stage
    from tdm.finetune import train
out = Path(sys.argv[1])
cfg = config.load(sys.argv[2], ["model.channels=[32, 32]", "teacher_ft.steps=60", "teacher_ft.batch_size=16",
                                "teacher_ft.eval_samples=0", "teacher_ft.checkpoint_every=30",
                                f"eval.weights_dir={out}/w"])
_, ema, res = train(cfg, StagePaths.of("teacher_ft", out), progress=False)
torch.save({"ema": dict(ema.shadow), "loss": res.final_loss}, out / "result.pt")
"""


def run(code_root: Path, out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code_root), "TDM_MLFLOW": "0", "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", RUN, str(out), str(REPO / "params.yaml")], env=env, check=True,
                   capture_output=True)
    import torch

    return torch.load(out / "result.pt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--old", required=True, help="a checkout of the older code")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        old, new = run(Path(args.old), Path(tmp) / "old"), run(REPO, Path(tmp) / "new")
    import torch

    same = old["loss"] == new["loss"] and all(torch.equal(old["ema"][k], new["ema"][k]) for k in old["ema"])
    print(f"final loss old {old['loss']!r} new {new['loss']!r}; EMA weights bitwise equal: {same}")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
