import json
from pathlib import Path

import pytest
import torch

from conftest import PARAMS
from tdm import checkpoint as ckpt
from tdm import config
from tdm.backbones import load_backbone
from tdm.config import StagePaths
from tdm.distill import TDMTrainer, draw_points, run, train
from tdm.schedule import student_timesteps
from tdm.training import TrainingDiverged

TINY = ["distill.batch_size=8", "distill.iterations=4", "distill.log_every=2", "distill.checkpoint_every=2",
        "distill.eval_samples=0", "distill.fake_lr=1e-3", "distill.lr=2e-4"]


def _cfg(teacher_dir, tmp_path, *extra):
    return config.load(PARAMS, [f"distill.teacher={teacher_dir}", f"eval.weights_dir={tmp_path / 'w'}", *TINY, *extra])


def test_draws_respect_the_intervals(teacher_dir, tmp_path):
    grid = student_timesteps(4, 900)
    g = torch.Generator().manual_seed(0)
    for interval, random_mid in [("separate", False), ("shared", False), ("separate", True)]:
        cfg = _cfg(teacher_dir, tmp_path, f"distill.interval={interval}", f"distill.random_mid={random_mid}")
        p = draw_points(grid, -1, 4000, cfg, g)
        assert set(p.step.tolist()) == {0, 1, 2, 3}
        assert torch.equal(p.t_in, grid[p.step])
        following = torch.tensor([674, 449, 224, -1])[p.step]
        assert (p.t_mid >= following).all() and (p.t_mid < p.t_in).all()
        if not random_mid:
            assert torch.equal(p.t_mid, following)
        assert (p.tau >= p.t_mid.clamp(min=20)).all()
        upper = p.t_in - 10 if interval == "separate" else torch.full_like(p.t_in, 890)
        assert (p.tau < upper).all()
        if interval == "shared":  # some taus land above their own step's input time
            assert (p.tau > p.t_in).any()


def _snapshot(params):
    return {n: p.detach().clone() for n, p in params.items()}


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_iteration_trains_student_and_fake_only(teacher_dir, tmp_path, mode):
    from accelerate import Accelerator

    cfg = _cfg(teacher_dir, tmp_path, f"distill.mode={mode}")
    backbone = load_backbone(teacher_dir)
    trainer = TDMTrainer(cfg, backbone, Accelerator(cpu=True))
    base = _snapshot({n: p for n, p in backbone.net.named_parameters() if "lora_" not in n})
    student, fake = _snapshot(trainer.roles.named_parameters("student")), _snapshot(trainer.roles.named_parameters("fake"))
    metrics = trainer.iteration(0)
    metrics = trainer.iteration(1)  # LoRA B starts at zero: the A side moves from the second step
    assert all(torch.isfinite(v) for k, v in metrics.items() if not k.startswith("dm_gap_"))  # NaN: not drawn
    for name in ("loss_fake", "loss_gen", "grad_norm_fake", "grad_norm_gen", "is_weight_mean"):
        assert metrics[name] > 0
    changed = lambda before, now: any(not torch.equal(before[n], p) for n, p in now.items())  # noqa: E731
    assert changed(student, trainer.roles.named_parameters("student"))
    assert changed(fake, trainer.roles.named_parameters("fake"))
    for n, p in backbone.net.named_parameters():  # the teacher (LoRA: the shared base) never moves
        if "lora_" not in n:
            assert torch.equal(base[n], p), n
    if mode == "lora":
        assert len(trainer.roles.parameters("student")) < len(base)  # adapters only


def test_stage_saves_a_sampleable_student(teacher_dir, tmp_path):
    from tdm.sampler import sample_student
    from tdm.student import load_student

    cfg = _cfg(teacher_dir, tmp_path, "distill.mode=lora", "distill.unify=true", "distill.eval_samples=10")
    paths = StagePaths.of("distill", tmp_path)
    metrics = run(cfg, paths, progress=False)
    assert metrics["iterations"] == 4 and {"eval_k1_fid", "eval_k2_fid", "eval_k4_fid"} <= metrics.keys()
    assert json.loads(paths.metrics.read_text())["iterations"] == 4
    folder = paths.out_dir / "student"
    student = load_student(folder)
    assert student.record.total_steps == 900 and student.record.unify and student.record.sampling_ks == (1, 2, 4)
    assert student.k_embedding is not None and student.record.guidance == cfg.distill.guidance
    samples = {k: sample_student(student, ["a handwritten digit one"] * 3, k=k) for k in (1, 2, 4)}
    assert all(images.shape == (3, 8, 8, 1) for images in samples.values())
    with pytest.raises(ValueError, match="K up to 4"):
        sample_student(student, ["a handwritten digit one"], k=5)
    assert (paths.out_dir / "student_lora" / "adapter_model.safetensors").is_file()
    # The adapter folder is peft's own layout: PeftModel.from_pretrained on the teacher's denoiser gives the merged
    # student's denoiser (K embedding aside: it lives beside the student, in neither).
    from peft import PeftModel

    from tdm.backbones import load_backbone

    peft_net = PeftModel.from_pretrained(load_backbone(teacher_dir).net, paths.out_dir / "student_lora")
    x, t = torch.randn(2, *student.backbone.sample_shape), torch.tensor([899, 449])
    cond = student.backbone.encode_prompts(["a handwritten digit one"] * 2)
    with torch.no_grad():
        torch.testing.assert_close(student.backbone.predict(peft_net, x, t, cond),
                                   student.backbone.predict(student.net, x, t, cond), atol=1e-5, rtol=1e-5)
    rows = [json.loads(line) for line in (paths.out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and {"loss_fake", "grad_norm_gen", "lr", "k"} <= rows[0].keys()
    # Re-run the stage in full mode: the LoRA of the LoRA run no longer matches the student and must go.
    run(_cfg(teacher_dir, tmp_path, "distill.mode=full"), paths, progress=False)
    assert not (paths.out_dir / "student_lora").exists() and (paths.out_dir / "student").is_dir()


def test_divergence_stops_and_keeps_the_last_good_checkpoint(teacher_dir, tmp_path):
    cfg = _cfg(teacher_dir, tmp_path, "distill.iterations=40", "distill.lr=1e12", "distill.fake_lr=1e12",
               "distill.grad_clip=1e30", "distill.warmup_steps=0", "distill.checkpoint_every=1", "distill.log_every=1")
    paths = StagePaths.of("distill", tmp_path)
    with pytest.raises(TrainingDiverged, match="non-finite"):
        train(cfg, paths, progress=False)
    for c in ckpt.list_checkpoints(paths.out_dir / "checkpoints"):
        state = ckpt.load_state(c)["trainer"]
        assert all(torch.isfinite(v).all() for v in state["student"].values())


def test_gradient_checkpointing_gives_the_same_iteration(teacher_dir, tmp_path):
    from accelerate import Accelerator

    results = []
    for flag in ("false", "true"):
        cfg = _cfg(teacher_dir, tmp_path, f"distill.gradient_checkpointing={flag}")
        torch.manual_seed(0)  # LoRA's A matrices are drawn at random: the same draw for both
        trainer = TDMTrainer(cfg, load_backbone(teacher_dir), Accelerator(cpu=True))
        trainer.iteration(0)
        results.append(trainer.roles.state_dict("student"))
    for name, tensor in results[0].items():
        torch.testing.assert_close(results[1][name], tensor, atol=1e-5, rtol=1e-5)


def _scaled_accelerator(init_scale=None):
    """A CPU accelerator holding the GradScaler a CUDA fp16 accelerator holds (so `backward` scales the loss)."""
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    if init_scale is not None:
        acc.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    return acc


@pytest.mark.parametrize("fake_updates", [1, 2])
def test_fp16_loss_scaling_is_undone_before_clipping_and_stepping(teacher_dir, tmp_path, fake_updates):
    """distill's optimisers are its own (not prepared), so it must unscale: the clip, the logged norms and the
    step see the true gradients (a power-of-two scale is undone exactly: bitwise the unscaled run); with extra
    fake-score updates (distill.fake_updates) the scaler is updated after each unscale_/step round."""
    cfg = _cfg(teacher_dir, tmp_path, "distill.mode=lora", "distill.warmup_steps=0",
               f"distill.fake_updates={fake_updates}")
    runs = {}
    for scale in (None, 2.0**16):
        torch.manual_seed(0)
        trainer = TDMTrainer(cfg, load_backbone(teacher_dir), _scaled_accelerator(scale))
        norms = [(float(m["grad_norm_fake"]), float(m["grad_norm_gen"])) for m in map(trainer.iteration, range(3))]
        runs[scale] = norms, trainer.roles.state_dict("student"), trainer.roles.state_dict("fake")
    assert runs[2.0**16][0] == runs[None][0]
    for part in (1, 2):
        for name, tensor in runs[None][part].items():
            assert torch.equal(runs[2.0**16][part][name], tensor), name


def test_fp16_overflow_skips_the_step_and_lowers_the_scale(teacher_dir, tmp_path):
    cfg = _cfg(teacher_dir, tmp_path, "distill.mode=lora", "distill.warmup_steps=0")
    torch.manual_seed(0)
    trainer = TDMTrainer(cfg, load_backbone(teacher_dir), _scaled_accelerator(2.0**127))  # loss x 2^127: inf grads
    before = {r: trainer.roles.state_dict(r) for r in ("student", "fake")}
    metrics = trainer.iteration(0)
    assert torch.isfinite(metrics["loss_fake"]) and not torch.isfinite(metrics["grad_norm_gen"])
    after = {r: trainer.roles.state_dict(r) for r in ("student", "fake")}
    assert all(torch.equal(v, after["student"][n]) for n, v in before["student"].items())  # the step was skipped
    assert all(torch.isfinite(v).all() for role in after.values() for v in role.values())  # no inf reached a weight
    assert trainer.accelerator.scaler.get_scale() == 2.0**126
    assert "scaler" in trainer.state_dict()


def test_a_teacher_retrained_at_the_same_path_starts_distillation_afresh(tiny_digits, tmp_path):
    """The resume key holds the teacher's identity (its weights), not just its path."""
    import copy

    teacher = tmp_path / "teacher"
    tiny_digits.save(teacher)
    cfg = _cfg(teacher, tmp_path)
    paths = StagePaths.of("distill", tmp_path)
    train(cfg, paths, progress=False, stop_after=2)
    assert train(cfg, paths, progress=False, stop_after=3)[1]["resumed_from"] == 2  # same teacher: resumes
    retrained = copy.copy(tiny_digits)
    retrained.net = copy.deepcopy(tiny_digits.net)
    with torch.no_grad():
        retrained.net.conv_out.bias.add_(0.01)
    retrained.save(teacher)
    assert train(cfg, paths, progress=False)[1]["resumed_from"] is None


def test_the_configured_grid_is_trained_on_and_recorded(teacher_dir, tmp_path):
    """distill.timesteps / distill.shift: the one grid of the draws, the rollout and the saved record."""
    from tdm.student import StudentRecord

    cfg = _cfg(teacher_dir, tmp_path, "distill.timesteps=[899, 700, 500, 100]", "distill.iterations=2")
    paths = StagePaths.of("distill", tmp_path)
    trainer, _ = train(cfg, paths, progress=False)
    assert trainer.grid.at(4).tolist() == [899, 700, 500, 100]
    g = torch.Generator().manual_seed(0)
    pts = draw_points(trainer.grid.at(4), -1, 256, cfg, g)
    assert set(pts.t_in.tolist()) <= {899, 700, 500, 100} and set(pts.t_mid.tolist()) <= {700, 500, 100, -1}
    run(cfg, paths, progress=False)
    assert StudentRecord.load(paths.out_dir / "student").timesteps(4).tolist() == [899, 700, 500, 100]
    shifted = _cfg(teacher_dir, tmp_path, "distill.shift=2.0", "distill.unify=true", "distill.iterations=2")
    run(shifted, paths, progress=False)
    record = StudentRecord.load(paths.out_dir / "student")
    assert record.shift == 2.0 and record.timesteps(4).tolist() == [899, 770, 599, 359]


# -- recipe switches (issue #16) and 8-bit AdamW (issue #15) ---------------------------------------------------
def _trainer(teacher_dir, tmp_path, *extra):
    from accelerate import Accelerator

    torch.manual_seed(0)
    return TDMTrainer(_cfg(teacher_dir, tmp_path, *extra), load_backbone(teacher_dir), Accelerator(cpu=True))


def test_fake_score_clip_schedule_and_decay_switches(teacher_dir, tmp_path):
    clipped = _trainer(teacher_dir, tmp_path, "distill.fake_grad_clip=1e-9", "distill.warmup_steps=4")
    free = _trainer(teacher_dir, tmp_path, "distill.fake_grad_clip=null", "distill.warmup_steps=4",
                    "distill.fake_lr_schedule=constant", "distill.fake_weight_decay=0.5")
    # Warm-up: a constant fake schedule starts at fake_lr; "same" follows the generator's warm-up.
    assert clipped.sched["fake"].get_last_lr()[0] == pytest.approx(1e-3 / 4)
    assert free.sched["fake"].get_last_lr()[0] == pytest.approx(1e-3)
    assert free.sched["student"].get_last_lr()[0] == pytest.approx(2e-4 / 4)
    assert free.opt["fake"].param_groups[0]["weight_decay"] == 0.5
    assert free.opt["student"].param_groups[0]["weight_decay"] == 0.0
    a, b = clipped.iteration(0), free.iteration(0)
    # The norm is reported before clipping either way; the fake score's first moment shows the clip (Adam's
    # normalised step would hide it in the weights).
    assert torch.allclose(a["grad_norm_fake"], b["grad_norm_fake"]) and a["grad_norm_fake"] > 1e-3
    moment = lambda t: sum(s["exp_avg"].abs().sum() for s in t.opt["fake"].state.values())  # noqa: E731
    assert 0 < moment(clipped) < moment(free) * 1e-3
    # The generator is clipped at grad_clip in both (its moments agree to float tolerance: same fake loss point).
    assert clipped.clip == {"student": 1.0, "fake": 1e-9} and free.clip == {"student": 1.0, "fake": None}


def test_raw_student_weights_keep_no_ema(teacher_dir, tmp_path):
    raw = _trainer(teacher_dir, tmp_path, "distill.student_weights=raw")
    raw.iteration(0)
    assert raw.ema is None and "ema" not in raw.state_dict()
    live = raw.roles.state_dict("student")
    assert all(torch.equal(live[n], w) for n, w in raw.student_weights().items())
    ema = _trainer(teacher_dir, tmp_path)
    ema.iteration(0)
    assert ema.student_weights() is ema.ema.shadow


def test_k_embedding_lr_and_norm_logged(teacher_dir, tmp_path):
    t = _trainer(teacher_dir, tmp_path, "distill.unify=true", "distill.k_embed_lr=0.05", "distill.warmup_steps=0")
    assert [g["lr"] for g in t.opt["student"].param_groups] == [2e-4, 0.05]
    m0 = t.iteration(0)
    assert m0["lr_k_embed"] / m0["lr"] == pytest.approx(0.05 / 2e-4)  # one schedule, two base rates
    m1 = t.iteration(1)
    assert m1["k_embed_norm"] > 0 and m1["k_embed_norm_fake"] > 0
    rows = torch.stack([m1[f"k_embed_norm_k{k}"] for k in (1, 2, 4)])
    assert torch.allclose(rows.norm(), m1["k_embed_norm"])  # the unused rows 0 and 3 stay zero
    same = _trainer(teacher_dir, tmp_path, "distill.unify=true")
    assert len(same.opt["student"].param_groups) == 1


BNB_EXTRA = Path(__file__).resolve().parents[2] / ".venv/extras/bitsandbytes"  # scripts/bootstrap.sh puts it there


def test_adamw8bit_trains_and_resumes(teacher_dir, tmp_path):
    import importlib.util
    import sys

    if importlib.util.find_spec("bitsandbytes") is None and BNB_EXTRA.is_dir():
        sys.path.insert(0, str(BNB_EXTRA))  # kept outside the venv so LoRA processes don't import it (bootstrap.sh)
    pytest.importorskip("bitsandbytes", reason=f"bitsandbytes==0.50.2 is neither installed nor in {BNB_EXTRA} "
                                               f"(bash scripts/bootstrap.sh)")
    import bitsandbytes as bnb

    from tdm.checkpoint import load_state, save_state

    t = _trainer(teacher_dir, tmp_path, "distill.optimizer=adamw8bit")
    assert isinstance(t.opt["student"], bnb.optim.AdamW8bit)
    before = t.roles.state_dict("student")
    metrics = t.iteration(0)
    assert torch.isfinite(metrics["loss_gen"])
    assert any(not torch.equal(before[n], w) for n, w in t.roles.state_dict("student").items())
    assert any(v.dtype == torch.uint8 for s in t.opt["student"].state.values() for v in s.values()
               if torch.is_tensor(v))  # 8-bit moments on the large tensors
    save_state(tmp_path / "ck", t.state_dict())
    again = _trainer(teacher_dir, tmp_path, "distill.optimizer=adamw8bit")
    again.load_state_dict(load_state(tmp_path / "ck"))
    a, b = t.iteration(1), again.iteration(1)
    assert torch.equal(a["loss_gen"], b["loss_gen"]) and torch.equal(a["loss_fake"], b["loss_fake"])


# -- #17 switches: a per-step guidance schedule, DMD2's two time-scale update rule ------------------------------
def test_a_constant_guidance_schedule_is_the_plain_guidance(teacher_dir, tmp_path):
    plain = _trainer(teacher_dir, tmp_path, "distill.guidance=2.0")
    scheduled = _trainer(teacher_dir, tmp_path, "distill.guidance=2.0", "distill.guidance_schedule=[2.0, 2.0, 2.0, 2.0]")
    for step in range(2):
        a, b = plain.iteration(step), scheduled.iteration(step)
        assert all(torch.equal(a[k], b[k]) for k in ("loss_gen", "loss_fake", "grad_norm_gen"))
    varied = _trainer(teacher_dir, tmp_path, "distill.guidance_schedule=[4.0, 1.0, 1.0, 1.0]")
    assert not torch.equal(varied.iteration(0)["loss_gen"], _trainer(teacher_dir, tmp_path).iteration(0)["loss_gen"])


def test_the_saved_record_and_the_evaluate_rows_carry_the_guidance_schedule(teacher_dir, tmp_path):
    from tdm.distill import student_record

    cfg = _cfg(teacher_dir, tmp_path, "distill.guidance=1.0", "distill.guidance_schedule=[3.0, 1.0, 1.0, 1.0]")
    record = student_record(cfg, "digits")
    assert record.guidance_schedule == (3.0, 1.0, 1.0, 1.0) and record.guidance_label == "3, 1, 1, 1 per step"
    assert student_record(_cfg(teacher_dir, tmp_path), "digits").guidance_schedule is None


def test_per_sample_guidance_guides_each_sample_at_its_own_scale(teacher_dir):
    from tdm.sampler import guided_x0_eps

    backbone = load_backbone(teacher_dir)
    torch.manual_seed(0)
    x = torch.randn(3, *backbone.sample_shape)
    t = torch.tensor([800, 500, 200])
    cond = backbone.encode_prompts(["a 3", "a 7", "a 1"])
    scales = torch.tensor([4.0, 1.0, 2.5])
    with torch.no_grad():
        x0, eps = guided_x0_eps(backbone, backbone.net, x, t, cond, scales)
        for i, w in enumerate(scales.tolist()):
            one = {k: v[i:i + 1] for k, v in cond.items()}
            x0_i, eps_i = guided_x0_eps(backbone, backbone.net, x[i:i + 1], t[i:i + 1], one, w)
            torch.testing.assert_close(x0[i:i + 1], x0_i, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(eps[i:i + 1], eps_i, atol=1e-5, rtol=1e-5)


def test_fake_updates_step_the_fake_score_more_but_its_schedule_per_iteration(teacher_dir, tmp_path):
    t = _trainer(teacher_dir, tmp_path, "distill.fake_updates=3", "distill.warmup_steps=4")
    for step in range(2):
        metrics = t.iteration(step)
    assert torch.isfinite(metrics["loss_fake"]) and torch.isfinite(metrics["loss_gen"])
    fake_steps = {int(s["step"]) for s in t.opt["fake"].state.values()}
    gen_steps = {int(s["step"]) for s in t.opt["student"].state.values()}
    assert fake_steps == {6} and gen_steps == {2}
    assert t.sched["fake"].last_epoch == t.sched["student"].last_epoch == 2
    from tdm.training import lr_factor

    assert t.sched["fake"].get_last_lr()[0] == pytest.approx(1e-3 * lr_factor(2, 4, 4, "cosine"))


@pytest.mark.parametrize("extra, message", [
    (["distill.guidance_schedule=[2.0, 1.0]"], "guidance_schedule: 2 entries for k = 4"),
    (["distill.unify=true", "distill.guidance_schedule=[2.0, 1.0, 1.0, 1.0]"], "guidance_schedule: one scale per step"),
    (["distill.guidance_schedule=[2.0, 0.5, 1.0, 1.0]"], "guidance_schedule"),
    (["distill.fake_updates=0"], "fake_updates"),
    (["distill.k_weights=[1, 1, 2]"], "k_weights: the K draw of TDM-unify"),
    (["distill.unify=true", "distill.k_weights=[1, 2]"], r"k_weights: 2 entries for k_choices \[1, 2, 4\]"),
    (["distill.unify=true", "distill.k_weights=[0, 0, 0]"], "k_weights: at least one weight must be positive"),
    (["distill.unify=true", "distill.k_weights=[1, -1, 2]"], "k_weights"),
])
def test_bad_schedule_switches_are_refused_by_key(teacher_dir, tmp_path, extra, message):
    with pytest.raises(config.ConfigError, match=message):
        _cfg(teacher_dir, tmp_path, *extra)


def test_the_dm_gap_is_logged_per_trajectory_step(teacher_dir, tmp_path):
    m = _trainer(teacher_dir, tmp_path).iteration(0)
    gaps = {k: v for k, v in m.items() if k.startswith("dm_gap_")}
    assert set(gaps) == {f"dm_gap_step{i}" for i in range(4)}  # the same keys every iteration and process
    drawn = [v for v in gaps.values() if torch.isfinite(v)]
    assert drawn and all(v > 0 for v in drawn)  # batch 8 over 4 steps: NaN only where no point was drawn
    unify = _trainer(teacher_dir, tmp_path, "distill.unify=true").iteration(0)
    keys = {k for k in unify if k.startswith("dm_gap_")}
    assert keys == {f"dm_gap_k{k}_step{i}" for k in (1, 2, 4) for i in range(k)}
    assert all(not torch.isfinite(unify[f"dm_gap_k{k}_step0"]) for k in (1, 2, 4) if k != int(unify["k"]))


def test_unify_draws_k_by_k_weights(teacher_dir, tmp_path):
    def draws(trainer, n=400):
        return [trainer.cfg.distill.k_choices[trainer._k_index(torch.Generator().manual_seed(i))] for i in range(n)]

    uniform = _trainer(teacher_dir, tmp_path, "distill.unify=true")
    weighted = _trainer(teacher_dir, tmp_path, "distill.unify=true", "distill.k_weights=[0, 1, 3]")
    # null keeps the uniform draw of earlier runs (the same K from the same generator)
    assert draws(uniform, 50) == [(1, 2, 4)[int(torch.randint(3, (1,), generator=torch.Generator().manual_seed(i)))]
                                  for i in range(50)]
    ks = draws(weighted)
    assert 1 not in ks  # weight 0: never drawn
    assert 0.65 < ks.count(4) / len(ks) < 0.85  # 3/4 expected; 400 draws: 5 standard deviations either side
    assert int(weighted.iteration(0)["k"]) in (2, 4)
