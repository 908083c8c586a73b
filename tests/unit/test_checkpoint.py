import pytest
import torch

from tdm import checkpoint as ckpt


def _optimizer_state():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.0, 0.95))
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    return model, opt


def test_round_trip_restores_nested_state(tmp_path):
    model, opt = _optimizer_state()
    state = {"step": 7, "model": model.state_dict(), "optimizer": opt.state_dict(), "rng": ckpt.rng_state(),
             "note": None, "pair": (1, 2.5), "names": ["a", "b"]}
    ckpt.save_state(tmp_path / "c", state)
    back = ckpt.load_state(tmp_path / "c")
    assert back["step"] == 7 and back["note"] is None and back["pair"] == (1, 2.5) and back["names"] == ["a", "b"]
    for k, v in model.state_dict().items():
        assert torch.equal(back["model"][k], v)
    # Optimiser state is keyed by int param index: it must load back into a fresh optimiser.
    model2, opt2 = _optimizer_state()
    opt2.load_state_dict(back["optimizer"])
    assert opt2.state_dict()["param_groups"][0]["betas"] == (0.0, 0.95)
    torch.testing.assert_close(opt2.state_dict()["state"][0]["exp_avg_sq"], opt.state_dict()["state"][0]["exp_avg_sq"])


def test_rng_state_restores_the_stream(tmp_path):
    ckpt.save_state(tmp_path / "c", {"rng": ckpt.rng_state()})
    a = torch.rand(5)
    ckpt.set_rng_state(ckpt.load_state(tmp_path / "c")["rng"])
    assert torch.equal(torch.rand(5), a)


def test_failed_write_leaves_no_checkpoint(tmp_path):
    with pytest.raises(TypeError, match="cannot checkpoint"):
        ckpt.save_state(ckpt.step_dir(tmp_path, 5), {"bad": object()})
    assert ckpt.list_checkpoints(tmp_path) == []
    assert list(tmp_path.iterdir()) == []


def test_latest_and_prune(tmp_path):
    for step in (5, 10, 15):
        ckpt.save_state(ckpt.step_dir(tmp_path, step), {"step": step})
    (tmp_path / ".step-0000020.crashed").mkdir()  # what a SIGKILL mid-write leaves
    assert ckpt.latest_checkpoint(tmp_path).name == "step-0000015"
    ckpt.prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-0000010", "step-0000015"]
    assert not list(tmp_path.glob(".step-*"))
    with pytest.raises(FileNotFoundError, match="incomplete checkpoint"):
        ckpt.load_state(tmp_path / "nothing")


def test_prune_keep_zero_removes_every_checkpoint(tmp_path):
    for s in (30, 40):
        ckpt.save_state(ckpt.step_dir(tmp_path, s), {"step": s})
    ckpt.prune_checkpoints(tmp_path, keep=0)
    assert ckpt.list_checkpoints(tmp_path) == []
    with pytest.raises(ValueError, match="keep"):
        ckpt.prune_checkpoints(tmp_path, keep=-1)


def test_a_damaged_newest_checkpoint_falls_back_quietly_on_stdout(tmp_path, capsys):
    for s in (1, 2):
        ckpt.save_state(ckpt.step_dir(tmp_path, s), {"step": s})
    (ckpt.step_dir(tmp_path, 2) / "state.safetensors").write_bytes(b"torn")
    path, state = ckpt.load_latest(tmp_path)
    assert state["step"] == 1
    out, err = capsys.readouterr()
    assert out == "" and "trying an older one" in err


# -- temps a killed write leaves (issue 18 case 16) ---------------------------------------------------------------
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from tdm import artifacts  # noqa: E402

_KILLED_WRITES = """
import json, os, sys, torch
from pathlib import Path
from tdm import artifacts, checkpoint as ckpt

def write(out, what):
    if what == "checkpoint":
        ckpt.save_state(ckpt.step_dir(out / "checkpoints", 4), {"w": torch.ones(3)})
    elif what == "model":
        with artifacts.atomic_folder(out / "model") as tmp:
            (tmp / "model.safetensors").write_bytes(b"new weights")
    elif what == "json":
        artifacts.write_json(out / "metrics.json", {"a": 1})
    elif what == "samples":
        artifacts.save_samples(out / "samples.npz", torch.zeros(2, 4, 4, 1, dtype=torch.uint8).numpy(), ["a", "b"])

for out, what, point in json.loads(sys.argv[1]):  # each write in a fork that SIGKILLs itself at `point`
    pid = os.fork()
    if pid == 0:
        os.environ["TDM_FAULT_AT"] = point
        write(Path(out), what)
        os._exit(0)
    print(os.waitpid(pid, 0)[1] & 0x7F, flush=True)  # the signal that ended it
"""

_CASES = [  # what is written, where it is killed, what the next write leaves
    ("model", "atomic_folder:1", "model"),  # temp folder written, not yet renamed
    ("model", "atomic_swap:1", "model"),  # old folder moved aside, new one not in place
    ("checkpoint", "atomic_folder:1", "checkpoints/step-0000004"),
    ("json", "atomic_write:1", "metrics.json"),
    ("samples", "atomic_write:1", "samples.npz"),  # the npz (its PNG is the second write)
    ("samples", "atomic_write:2", "samples.png"),
]
_SWEEP = [("", "model", "atomic_folder:1"), ("", "json", "atomic_write:1"), ("", "checkpoint", "atomic_folder:1"),
          ("samples", "json", "atomic_write:1")]  # in a subfolder: the recursive sweep finds it


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """Folders holding what killed writes left: case i of _CASES in case{i}/ (beside an existing model folder),
    the _SWEEP writes in distill/, one in sub/sub/. One process (importing tdm once) forks every write."""
    root = tmp_path_factory.mktemp("killed")
    jobs = []
    for i, (what, point, _) in enumerate(_CASES):
        (root / f"case{i}" / "model").mkdir(parents=True)
        (root / f"case{i}" / "model" / "model.safetensors").write_bytes(b"old weights")
        jobs.append((str(root / f"case{i}"), what, point))
    jobs += [(str(root / "distill" / sub), what, point) for sub, what, point in _SWEEP]
    jobs.append((str(root / "sub" / "sub"), "json", "atomic_write:1"))
    env = {k: v for k, v in os.environ.items() if k != "TDM_FAULT_AT"}
    run = subprocess.run([sys.executable, "-c", _KILLED_WRITES, json.dumps(jobs)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["9"] * len(jobs), run.stdout  # every write was SIGKILLed at its point
    return root


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*"))


@pytest.mark.parametrize("case", range(len(_CASES)), ids=[f"{w}-{p}" for w, p, _ in _CASES])
def test_a_killed_write_leaves_a_temp_that_the_next_write_removes(killed, capfd, case):
    what, point, final = _CASES[case]
    folder = killed / f"case{case}"
    left = _hidden(folder)
    assert left, "the kill left no temp: the fault point was not reached"
    if what == "model" and point.startswith("atomic_swap"):
        assert not (folder / "model").exists()  # the old one aside, the new one in its temp: both complete
    # The next write of that output (here in this process, as a rerun of the stage would) removes the temps.
    if what == "checkpoint":
        ckpt.save_state(ckpt.step_dir(folder / "checkpoints", 4), {"w": torch.ones(3)})
    elif what == "model":
        with artifacts.atomic_folder(folder / "model") as tmp:
            (tmp / "model.safetensors").write_bytes(b"new weights")
    elif what == "json":
        artifacts.write_json(folder / "metrics.json", {"a": 1})
    else:
        artifacts.save_samples(folder / "samples.npz", torch.zeros(2, 4, 4, 1, dtype=torch.uint8).numpy(), ["a", "b"])
    assert _hidden(folder) == []
    assert (folder / final).exists()
    err = capfd.readouterr().err
    assert err.count("left by an interrupted write") == len(left) and left[0] in err


def test_stage_start_sweep_removes_every_stale_temp_but_not_a_live_one(killed):
    out = killed / "distill"
    (out / "checkpoints" / ".step-0000008.abcd1234").mkdir()  # an unmarked temp of an earlier version
    (out / ".student.k2x_9abc").mkdir()  # earlier versions' unmarked temp of a model folder
    (out / ".notes.txt").write_text("not ours")  # a hidden file tdm did not write stays
    with artifacts.atomic_folder(out / "live") as live:  # a write in progress (this process holds it)
        remove_stale = subprocess.run(  # another process sweeps meanwhile
            [sys.executable, "-c", "import sys; from tdm import artifacts, checkpoint as c; "
             "artifacts.remove_stale_temps(sys.argv[1], recursive=True); "
             "c.remove_stale_temps(sys.argv[1] + '/checkpoints'); "
             "artifacts.remove_stale_temps(sys.argv[1], 'student')", str(out)],
            capture_output=True, text=True, timeout=120)
        assert remove_stale.returncode == 0, remove_stale.stderr
        assert live.is_dir() and artifacts.in_use(live)
        (live / "w").write_text("x")
    assert (out / "live" / "w").read_text() == "x"
    assert _hidden(out) == [".notes.txt"]
    assert remove_stale.stderr.count("left by an interrupted write") == 6


def test_without_recursive_a_subfolder_is_left_alone(killed):
    assert artifacts.remove_stale_temps(killed / "sub") == []
    assert len(artifacts.remove_stale_temps(killed / "sub", recursive=True)) == 1 and _hidden(killed / "sub") == []


def test_prune_keeps_a_checkpoint_being_written(tmp_path):
    ckpt.save_state(ckpt.step_dir(tmp_path, 2), {"step": 2})
    with artifacts.atomic_folder(ckpt.step_dir(tmp_path, 4)) as tmp:
        ckpt.prune_checkpoints(tmp_path, keep=0)
        assert tmp.is_dir()
        (tmp / "state.json").write_text("{}")
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-0000004"]


def test_an_error_mid_swap_puts_the_old_folder_back(tmp_path, monkeypatch):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "w").write_text("old")
    real_rename = os.rename

    def rename(src, dst):  # the second rename (new folder into place) fails, as on a full or read-only disk
        if Path(src).name.startswith(".model.tmp-"):
            raise OSError(28, "No space left on device")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="No space"):
        with artifacts.atomic_folder(tmp_path / "model") as tmp:
            (tmp / "w").write_text("new")
    assert (tmp_path / "model" / "w").read_text() == "old"
    assert not [p for p in tmp_path.iterdir() if p.name != "model"]  # the empty aside folder is gone too
