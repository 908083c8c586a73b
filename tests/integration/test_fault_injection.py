"""Fault injection (issue 18, done means): a stage killed with SIGKILL at random moments — during iterations,
checkpoint writes, model saves, log flushes and rewrites, metric writes — and rerun each time ends bitwise
identical to an uninterrupted run, with no stray file (temp folder or file) left anywhere.

The kills are SIGKILLs of real processes. Most land at named points of the production code
(`TDM_FAULT_AT=<point>[@<target>][:<n>]`, `tdm.artifacts.fault_point`: the moment a temp is written but not yet
renamed, an old folder moved aside, a log row flushed, a step done), the counts drawn from a seeded RNG; one
lands at a seeded random delay wherever the run is, and one run leaves a torn last log line as a kill mid-flush
(or a full disk) does. To fit CI, the runs are forks of one driver process that imported tdm once (each fork
runs `tdm.cli.main` as the `tdm` command would and exits; the fork's start costs nothing, a fresh interpreter
~15 s): the driver itself runs no tdm code, so each fork starts as a fresh process would.
"""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from test_distill_processes import _distill_cmd

pytestmark = pytest.mark.slow

_DRIVER = r"""
import json, os, signal, sys, time
import tdm.cli, tdm.distill, tdm.teacher_ft, tdm.tracking, tdm.checkpoint  # imported once; forks share them
import accelerate, safetensors.torch  # noqa: F401
t0 = time.monotonic()

def run(job):
    t = time.monotonic()
    pid = os.fork()
    if pid == 0:
        os.chdir(job["cwd"])
        fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1), os.dup2(fd, 2)
        if job.get("fault"):
            os.environ["TDM_FAULT_AT"] = job["fault"]
        code = 1
        try:
            code = tdm.cli.main(job["argv"])
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os._exit(code)
    status = None  # set once the child is reaped: a poll that reaps it keeps its status (a second wait: ECHILD)
    if job.get("kill_after") is not None:  # a random moment, wherever the run is
        deadline = time.monotonic() + job["kill_after"]
        while status is None and time.monotonic() < deadline:
            reaped, st = os.waitpid(pid, os.WNOHANG)
            if reaped:
                status = st
            else:
                time.sleep(0.01)
        if status is None:
            os.kill(pid, signal.SIGKILL)  # not reaped yet, so the pid is still this child's
    if status is None:
        _, status = os.waitpid(pid, 0)
    code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    if job.get("torn_tail"):  # what a kill (or a full disk) in the middle of a log flush leaves
        with open(os.path.join(job["cwd"], job["torn_tail"]), "a") as f:
            f.write('{"step": 99, "loss_fa')
    return {"code": code, "s": round(time.monotonic() - t, 1), "at": round(t - t0, 1)}

chains = json.loads(sys.argv[1])
runners = []
for c, chain in enumerate(chains):  # the lanes run side by side, each one's runs in order
    pid = os.fork()
    if pid == 0:
        for i, job in enumerate(chain):
            print(json.dumps({"chain": c, "job": i, **run(job)}), flush=True)
        os._exit(0)
    runners.append(pid)
sys.exit(max(os.waitpid(pid, 0)[1] for pid in runners) and 1)
"""


def _run_lanes(lanes: list[list[list[dict]]], timeout: int) -> list[list[list[int]]]:
    """Run the lanes side by side (two: the test machines have two cores); in each, its chains of jobs one after
    the other, each chain's jobs in order. Returns each job's exit code (-9: SIGKILLed), lane by lane."""
    env = {**os.environ, "TDM_NUM_THREADS": "1", "TDM_MLFLOW": "0"}
    env.pop("TDM_FAULT_AT", None)
    flat = [[job for chain in lane for job in chain] for lane in lanes]
    run = subprocess.run([sys.executable, "-c", _DRIVER, json.dumps(flat)], env=env, capture_output=True,
                         text=True, timeout=timeout)
    assert run.returncode == 0, run.stderr[-3000:]
    print(run.stdout)  # per run: exit code, seconds, start (shown when the test fails)
    codes = [[None] * len(jobs) for jobs in flat]
    for line in run.stdout.splitlines():
        row = json.loads(line)
        codes[row["chain"]][row["job"]] = row["code"]
    out = []
    for lane, lane_codes in zip(lanes, codes):
        at, split = 0, []
        for chain in lane:
            split.append(lane_codes[at:at + len(chain)])
            at += len(chain)
        out.append(split)
    return out


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` (folders as None), relative."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def _comparable(name: str, data: bytes | None):
    """A file's bytes, less the two values that measure time, not the run (wall-clock training time, and
    where the last session resumed from)."""
    if data is not None and (name.endswith("/state.json") or name.startswith("metrics/") and name.endswith(".json")):
        obj = json.loads(data)
        timing = ("train_time_s", "resumed_from")
        if "__dict__" in obj:  # a checkpoint's skeleton (tdm.checkpoint): [[key, value], ...]
            return [kv for kv in obj["__dict__"] if kv[0] not in timing]
        return {k: v for k, v in obj.items() if k not in timing}
    return data


def _assert_same_outputs(clean: Path, faulted: Path) -> None:
    """Every path of the clean run, and no other, in the faulted one; every file bitwise equal (timing aside;
    tokenizer.json too: the backbones save it without the last call's settings)."""
    a, b = _tree(clean), _tree(faulted)
    stray = sorted(set(b) - set(a))
    assert not stray, f"stray files left by the kills: {stray}"
    assert sorted(a) == sorted(b), sorted(set(a) - set(b))
    assert any(name.endswith("diffusion_pytorch_model.safetensors") for name in a)  # the weights are compared
    assert any("/checkpoints/step-" in name for name in a) and any(name.endswith("metrics.jsonl") for name in a)
    assert any(name.endswith("tokenizer.json") for name in a)
    for name in a:
        assert _comparable(name, a[name]) == _comparable(name, b[name]), f"{name} differs"




def _hidden(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*") if p.name != ".locks"
                  and ".locks" not in p.parts)


def _chain(plan: list[tuple[str | None, str]], cwd: Path, argv: list[str], log: str, rng: random.Random,
           torn_log: str) -> list[dict]:
    """One job per step of `plan`; each run resumes from what the previous killed one left. A step without a
    fault point is SIGKILLed after a seeded random delay (then a torn log line is left), except the last."""
    jobs = []
    for i, (fault, _) in enumerate(plan):
        job = {"cwd": str(cwd), "argv": argv, "log": f"{log}{i}.log", "fault": fault}
        if fault is None and i < len(plan) - 1:
            job["kill_after"] = round(rng.uniform(1.0, 6.0), 2)
            job["torn_tail"] = torn_log
        jobs.append(job)
    return jobs


def _check_chain(plan, codes, logs, torn_at: int) -> None:
    for i, ((fault, what), code) in enumerate(zip(plan, codes)):
        if fault is not None:
            assert code == -9, f"run {i} ({what}, {fault}) was not killed: exit {code}\n{logs[i][-3000:]}"
    assert codes[-1] == 0, logs[-1][-3000:]
    # The kills in writes left temps; the next runs removed them, each with a note.
    assert "".join(logs).count("left by an interrupted write") >= 4, "".join(logs)[-3000:]
    assert "is not a log row; dropped" in logs[torn_at + 1]  # the torn tail


def test_stages_killed_at_random_moments_resume_bitwise_identical(teacher_dir, tmp_path):
    rng = random.Random(18)
    distill = _distill_cmd(teacher_dir, 12, 4)[3:]  # tdm distill ...: 12 iterations, a checkpoint every 4, log 1
    teacher = ["teacher-ft", "-q", "-S", "model.channels=[32, 32]", "-S", "teacher_ft.batch_size=8",
               "-S", "teacher_ft.steps=8", "-S", "teacher_ft.checkpoint_every=4", "-S", "teacher_ft.log_every=2",
               "-S", "teacher_ft.warmup_steps=2", "-S", "teacher_ft.eval_samples=0"]
    for name in ("clean", "faulted", "clean_ft", "faulted_ft"):
        (tmp_path / name).mkdir()
    distill_plan = [  # (fault point, what it interrupts)
        (f"iteration:{rng.randint(2, 7)}", "an iteration"),
        ("atomic_write@metrics.jsonl", "the log rewrite at resume"),
        ("atomic_folder@step-0000008", "a checkpoint write"),
        (f"log_flush:{rng.randint(1, 3)}", "a log flush"),
        (None, "a random moment"),
        ("atomic_folder@student", "the model save (temp written)"),
        ("atomic_write@distill.json", "the metrics write"),
        ("atomic_swap@student", "the model save (old model moved aside)"),
        (None, "nothing: the run completes"),
    ]
    teacher_plan = [
        (f"log_flush:{rng.randint(1, 3)}", "a log flush"),
        ("atomic_folder@step-0000008", "a checkpoint write"),
        (None, "a random moment"),
        ("atomic_folder@model", "the model save (temp written)"),
        ("atomic_write@teacher_ft.json", "the metrics write"),
        ("atomic_swap@model", "the model save (old model moved aside)"),
        (None, "nothing: the run completes"),
    ]
    distill_jobs = _chain(distill_plan, tmp_path / "faulted", distill, str(tmp_path / "distill"), rng,
                          "outputs/distill/metrics.jsonl")
    teacher_jobs = _chain(teacher_plan, tmp_path / "faulted_ft", teacher, str(tmp_path / "teacher"), rng,
                          "outputs/teacher_ft/metrics.jsonl")
    clean_job = {"cwd": str(tmp_path / "clean"), "argv": distill, "log": str(tmp_path / "clean.log")}
    clean_ft_job = {"cwd": str(tmp_path / "clean_ft"), "argv": teacher, "log": str(tmp_path / "clean_ft.log")}
    (clean, faulted_ft), (clean_ft, faulted) = _run_lanes([[[clean_job], teacher_jobs],
                                                           [[clean_ft_job], distill_jobs]], timeout=600)
    assert clean == [0], (tmp_path / "clean.log").read_text()[-3000:]
    assert clean_ft == [0], (tmp_path / "clean_ft.log").read_text()[-3000:]
    _check_chain(distill_plan, faulted, [Path(j["log"]).read_text() for j in distill_jobs], torn_at=4)
    _check_chain(teacher_plan, faulted_ft, [Path(j["log"]).read_text() for j in teacher_jobs], torn_at=2)
    assert _hidden(tmp_path / "faulted") == [] and _hidden(tmp_path / "faulted_ft") == []
    _assert_same_outputs(tmp_path / "clean", tmp_path / "faulted")
    _assert_same_outputs(tmp_path / "clean_ft", tmp_path / "faulted_ft")
