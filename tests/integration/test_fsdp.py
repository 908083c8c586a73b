"""FSDP2 distillation on two gloo CPU processes, launched with the shipped configs/accelerate/fsdp.yaml.

One `accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 2` runs this file as its
script (`main`, below): each case trains the same tiny digits student twice in the same processes, sharded
(FSDP, as the config sets) and unsharded (the config's ACCELERATE_USE_FSDP switched off: plain DDP-style
replicas with tdm's gradient averaging), then a sharded run stopped at iteration 2 and resumed. One launch,
because starting two processes (imports) costs ~45 s on the 2-core box, the training itself seconds.

The test then checks: FSDP == DDP in losses, gradient norms and the saved student to float32 tolerance (FSDP
reduce-scatters where DDP all-reduces, summing in another order: not bitwise), every checkpoint holds full
tensors, resume under FSDP is bitwise exact, and the saved student loads and samples.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tdm import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[2]
# float32 sums over 2 processes in another order, through 4 AdamW steps; measured max differences are reported
# in docs/performance.md ("DDP and FSDP"), far below these.
TOL = dict(rtol=1e-4, atol=1e-5)
TINY = ["distill.batch_size=4", "distill.iterations=4", "distill.log_every=1", "distill.checkpoint_every=2",
        "distill.eval_samples=0", "distill.fake_lr=1e-3", "distill.lr=2e-4", "distill.k=2",
        "distill.grad_clip=0.05"]  # a clip that binds (grad norms ~0.1-1): the global norm must be the one clipped
CASES = {"lora": ["distill.mode=lora"],
         # full mode: teacher, student, fake each sharded; TDM-unify's K embeddings sharded too (per-process K)
         "full": ["distill.mode=full", "distill.unify=true", "distill.k_choices=[1, 2]"]}


def main(out: Path, teacher: str) -> None:
    """Runs on each of the launched processes."""
    from tdm import config
    from tdm.config import StagePaths
    from tdm.distill import run, train

    for case, extra in CASES.items():
        cfg = config.load(REPO / "params.yaml", [f"distill.teacher={teacher}", *TINY, *extra])
        for variant, fsdp in (("fsdp", "true"), ("ddp", "false")):
            os.environ["ACCELERATE_USE_FSDP"] = fsdp
            run(cfg, StagePaths.of("distill", out / case / variant), progress=False)
        os.environ["ACCELERATE_USE_FSDP"] = "true"
    cfg = config.load(REPO / "params.yaml", [f"distill.teacher={teacher}", *TINY, *CASES["lora"]])
    paths = StagePaths.of("distill", out / "lora" / "resumed")
    train(cfg, paths, progress=False, stop_after=2)  # as a kill after the checkpoint at 2 would leave it
    run(cfg, paths, progress=False)


def _log(run: Path) -> list[dict]:
    return [json.loads(r) for r in (run / "outputs/distill/metrics.jsonl").read_text().splitlines()]


def _student(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "outputs/distill/student/unet/diffusion_pytorch_model.safetensors")


def _same_run(fsdp: Path, ddp: Path, teacher: Path) -> None:
    a, b = _log(fsdp), _log(ddp)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for key in ("loss_fake", "loss_gen", "grad_norm_fake", "grad_norm_gen", "k"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-4, abs=1e-7), (ra["step"], key)
    sa, sb = _student(fsdp), _student(ddp)
    assert sa.keys() == sb.keys()
    for name in sa:
        torch.testing.assert_close(sa[name], sb[name], **TOL, msg=name)
    start = load_file(teacher / "unet/diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(sa[n], start[n]) for n in sa)  # the students trained: not two teacher copies
    for run in (fsdp, ddp):  # checkpoints of both hold full tensors, in one format
        state = ckpt.load_state(ckpt.latest_checkpoint(run / "outputs/distill/checkpoints"))["trainer"]
        for name, tensor in state["student"].items():
            if not name.startswith("k_embedding."):
                full = name.replace(".base_layer.", ".")
                assert "lora_" in name or tensor.shape == start[full].shape, name


@pytest.fixture(scope="module")
def launched(teacher_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TDM_NUM_THREADS": "1", "TDM_MLFLOW": "0"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "configs/accelerate/fsdp.yaml"), "--num_processes", "2", "--main_process_port", "29641",
           __file__, str(out), str(teacher_dir)]
    proc = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def test_lora_fsdp_matches_ddp(launched, teacher_dir):
    """LoRA mode: the one base with both adapters sharded, vs replicas with tdm's gradient averaging."""
    _same_run(launched / "lora/fsdp", launched / "lora/ddp", teacher_dir)
    adapter = load_file(next((launched / "lora/fsdp/outputs/distill/student_lora").glob("*.safetensors")))
    assert adapter and all(torch.isfinite(t).all() for t in adapter.values())


def test_full_unify_fsdp_matches_ddp_and_the_student_samples(launched, teacher_dir):
    """Full mode (teacher, student, fake each sharded) with the K embeddings sharded: FSDP == DDP; the saved
    student loads and samples at each K it was trained for."""
    from tdm.sampler import sample_student
    from tdm.student import load_student

    fsdp, ddp = launched / "full/fsdp", launched / "full/ddp"
    _same_run(fsdp, ddp, teacher_dir)
    emb_a = load_file(fsdp / "outputs/distill/student/k_embedding.safetensors")
    emb_b = load_file(ddp / "outputs/distill/student/k_embedding.safetensors")
    torch.testing.assert_close(emb_a["weight"], emb_b["weight"], **TOL)
    assert emb_a["weight"].abs().max() > 0  # it trained (it starts at zero)
    student = load_student(fsdp / "outputs/distill/student")
    for k in (1, 2):
        images = sample_student(student, ["a handwritten digit three", "a handwritten digit seven"], k=k, seed=0,
                                batch_size=2)
        assert images.shape == (2, 8, 8, 1) and images.dtype == torch.uint8 and images.float().std() > 0


def test_fsdp_resume_is_exact(launched):
    """Stopped at 2 (checkpoint) and resumed under FSDP == the uninterrupted FSDP run, bitwise."""
    whole, resumed = launched / "lora/fsdp", launched / "lora/resumed"
    assert json.loads((resumed / "metrics/distill.json").read_text())["resumed_from"] == 2
    a = ckpt.load_state(ckpt.step_dir(whole / "outputs/distill/checkpoints", 4))["trainer"]
    b = ckpt.load_state(ckpt.step_dir(resumed / "outputs/distill/checkpoints", 4))["trainer"]
    for part in ("student", "fake"):
        for name, tensor in a[part].items():
            assert torch.equal(tensor, b[part][name]), (part, name)
    for name, tensor in a["ema"]["shadow"].items():
        assert torch.equal(tensor, b["ema"]["shadow"][name]), name
    for role in ("opt_student", "opt_fake"):  # the gathered AdamW moments
        for i, s in a[role]["state"].items():
            assert torch.equal(s["exp_avg"], b[role]["state"][i]["exp_avg"]), (role, i)
            assert torch.equal(s["exp_avg_sq"], b[role]["state"][i]["exp_avg_sq"]), (role, i)
    assert _log(whole) == _log(resumed)
    assert all(torch.equal(t, _student(resumed)[n]) for n, t in _student(whole).items())


if __name__ == "__main__":  # under accelerate launch (the fixture above)
    sys.path.insert(0, str(REPO / "tests"))
    import torch as _torch

    _torch.set_num_threads(1)
    main(Path(sys.argv[1]), sys.argv[2])
