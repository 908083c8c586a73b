"""Cost of one TDM iteration: ours against a naive iteration with the authors' structure, and against the
floor of its unavoidable passes, on the same model and batch, interleaved in one process.

Naive (the official demo's structure, on our roles and losses): the rollout always runs all K student
forwards, including the last one whose output no sampled step uses; the fake step recomputes the student's
prediction at the sampled point instead of reusing the rollout's, and runs a teacher forward it never uses;
the generator step recomputes the student's prediction once more without grad, runs the teacher's cond
and uncond as two forwards, and draws steps / t_mid / tau with per-sample Python loops.

Floor: the passes no implementation can skip, each timed alone: the rollout forwards ours runs, one fake
forward+backward, one batched (cond+uncond) teacher forward, one fake forward, one student forward+backward.

    .venv/bin/python benchmarks/iteration_cost.py --teacher outputs/teacher_ft/model
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from machine import machine_info  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def naive_iteration(trainer, step: int) -> None:
    from tdm.losses import fake_score_loss, generator_loss, importance_weight
    from tdm.schedule import student_timesteps
    from tdm.training import step_generator

    d, roles, schedule = trainer.cfg.distill, trainer.roles, trainer.backbone.schedule
    g = step_generator(d.seed, step)
    b = d.batch_size
    grid = student_timesteps(d.k, d.total_steps).tolist()
    prompts = [trainer.prompts[int(i)] for i in torch.randint(len(trainer.prompts), (b,), generator=g)]
    cond = trainer.backbone.encode_prompts(prompts)
    x = torch.randn((b, *trainer.backbone.sample_shape), generator=g)
    inputs = []
    with torch.no_grad():  # full depth, last forward included
        for j, t in enumerate(grid):
            inputs.append(x)
            x0, eps = roles.x0_eps("student", x, torch.full((b,), t), cond)
            x = schedule.ddim_step(x0, eps, grid[j + 1]) if j + 1 < len(grid) else x0

    def draws():
        idx, t_in, t_mid, tau, x_in = [], [], [], [], []
        for i in range(b):  # per-sample loops, as the demo
            s = int(torch.randint(len(grid), (1,), generator=g))
            mid = grid[s + 1] if s + 1 < len(grid) else -1
            lo, hi = max(d.tau_min, mid), grid[s] - d.tau_gap
            idx.append(s), t_in.append(grid[s]), t_mid.append(mid)
            tau.append(int(torch.randint(lo, max(hi, lo + 1), (1,), generator=g)))
            x_in.append(inputs[s][i])
        return torch.tensor(t_in), torch.tensor(t_mid), torch.tensor(tau), torch.stack(x_in)

    def noisy(x_in, t_in, t_mid, tau):
        x0, eps = roles.x0_eps("student", x_in, t_in, cond)  # recomputed
        x_mid = schedule.add_noise(x0, eps, t_mid)
        n = torch.randn(x0.shape, generator=g)
        x_tau, m = schedule.diffuse(x_mid, eps, t_mid, tau, n)
        return x0, x_tau, n, m

    t_in, t_mid, tau, x_in = draws()
    with torch.no_grad():
        x0, x_tau, n, m = noisy(x_in, t_in, t_mid, tau)
        roles.x0_eps("teacher", x_tau, tau, cond)  # computed, never used
    fake_x0, _ = roles.x0_eps("fake", x_tau, tau, cond)
    loss = fake_score_loss(fake_x0, x0, schedule.snr(tau), importance_weight(m, n), d.snr_clamp)
    trainer._update("fake", loss)
    t_in, t_mid, tau, x_in = draws()
    with torch.no_grad():
        _, x_tau, _, _ = noisy(x_in, t_in, t_mid, tau)
        cond_x0, _ = roles.x0_eps("teacher", x_tau, tau, cond)  # cond and uncond as two forwards
        uncond_x0, _ = roles.x0_eps("teacher", x_tau, tau, trainer.backbone.null_cond(b))
        teacher_x0 = uncond_x0 + d.guidance * (cond_x0 - uncond_x0)
        fake_x0, _ = roles.x0_eps("fake", x_tau, tau, cond)
    student_x0, _ = roles.x0_eps("student", x_in, t_in, cond)
    trainer._update("student", generator_loss(student_x0, teacher_x0, fake_x0, d.metric, d.huber_c))


def floor_passes(trainer, depth: int) -> float:
    """Seconds for the unavoidable passes of one iteration, each run alone."""
    roles, backbone, b = trainer.roles, trainer.backbone, trainer.cfg.distill.batch_size
    x = torch.randn((b, *backbone.sample_shape))
    t = torch.full((b,), 500)
    cond = backbone.encode_prompts(trainer.prompts[:b])
    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in range(depth):
            roles.x0_eps("student", x, t, cond)
        roles.teacher_guided_x0(x, t, cond, 2.0)
        roles.x0_eps("fake", x, t, cond)
    for role in ("fake", "student"):
        roles.x0_eps(role, x, t, cond)[0].pow(2).mean().backward()
    elapsed = time.perf_counter() - t0
    for role in ("fake", "student"):
        for p in roles.parameters(role):
            p.grad = None
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--teacher", default=str(REPO / "outputs/teacher_ft/model"))
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from accelerate import Accelerator

    from tdm import config
    from tdm.backbones import load_backbone
    from tdm.distill import TDMTrainer

    cfg = config.load(REPO / "params.yaml", [f"distill.teacher={args.teacher}", f"distill.batch_size={args.batch_size}"])
    trainer = TDMTrainer(cfg, load_backbone(args.teacher), Accelerator(cpu=True))
    ours, naive, floor = [], [], []
    trainer.iteration(0), naive_iteration(trainer, 0)  # warm-up
    for r in range(1, args.repeats + 1):
        t0 = time.perf_counter()
        trainer.iteration(r)
        ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        naive_iteration(trainer, r)
        naive.append(time.perf_counter() - t0)
        floor.append(floor_passes(trainer, depth=cfg.distill.k))
    med = {k: statistics.median(v) for k, v in (("ours", ours), ("naive", naive), ("floor", floor))}
    result = {"benchmark": "iteration_cost", "batch_size": args.batch_size, "k": cfg.distill.k,
              "median_s": med, "naive_over_ours": med["naive"] / med["ours"], "ours_over_floor": med["ours"] / med["floor"],
              "runs_s": {"ours": ours, "naive": naive, "floor": floor}, "machine": machine_info()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "iteration_cost.json").write_text(json.dumps(result, indent=2) + "\n")
    md = f"""# Cost of one TDM iteration (digits default, K={cfg.distill.k}, batch {args.batch_size}, 1 thread)

Command: `.venv/bin/python benchmarks/iteration_cost.py --teacher outputs/teacher_ft/model`; median of {args.repeats}
interleaved repeats in one process. Floor = the unavoidable passes timed alone: K rollout forwards (at batch
64 some sample nearly always draws the last step, so the rollout runs full depth, and its predictions are
reused as the fake step's targets), one batched CFG teacher forward, one fake forward, one fake and one
student forward+backward.

| iteration | median (s) |
|---|---|
| ours | {med['ours']:.3f} |
| naive (authors' structure) | {med['naive']:.3f} |
| floor of unavoidable passes | {med['floor']:.3f} |

naive / ours = **{result['naive_over_ours']:.2f}x** (target >= 1.25x); ours / floor = **{result['ours_over_floor']:.2f}x** (target <= 1.25x).
"""
    (RESULTS / "iteration_cost.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
