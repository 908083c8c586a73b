"""The one training loop (tdm/training.py) on a tiny regression: exact resume, one log, one NaN policy,
one fingerprint."""
import json

import pytest
import torch
from accelerate import Accelerator

from conftest import PARAMS
from tdm import checkpoint as ckpt
from tdm import config
from tdm.training import LoopSettings, TrainingDiverged, fingerprint, run_loop, step_generator


class Regression:
    """A linear model fitted to y = 3x by SGD: a TrainingState with a step the loop can drive."""

    def __init__(self, blow_up_at: int | None = None, poison_weights_at: int | None = None):
        self.w = torch.nn.Parameter(torch.zeros(4))
        self.spare = torch.zeros(2)  # a weight the loss does not read
        self.opt = torch.optim.SGD([self.w], lr=0.1, momentum=0.9)
        self.blow_up_at, self.poison_weights_at = blow_up_at, poison_weights_at

    def step(self, i: int) -> dict:
        g = step_generator(0, i)
        x = torch.randn(8, 4, generator=g)
        loss = ((x @ self.w - 3 * x.sum(1)) ** 2).mean()
        if self.blow_up_at is not None and i >= self.blow_up_at:
            loss = loss * float("inf")
        loss.backward()
        self.opt.step()
        self.opt.zero_grad()
        if self.poison_weights_at is not None and i >= self.poison_weights_at:
            with torch.no_grad():
                self.spare[1] = float("nan")  # the logged values stay finite
        return {"loss": loss.detach(), "w0": self.w.detach()[0].clone()}

    def state_dict(self) -> dict:
        return {"w": self.w.detach().clone(), "opt": self.opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.w.copy_(state["w"])
        self.opt.load_state_dict(state["opt"])

    def trainable(self) -> list:
        return [self.w, self.spare]


def _settings(tmp_path, total=12, every=4, log_every=2, fp="abc"):
    return LoopSettings("toy", total, every, log_every, fp, tmp_path, on_diverge="Lower toy.lr.")


def _run(tmp_path, state=None, stop_after=None, **kw):
    state = state or Regression()
    result = run_loop(Accelerator(cpu=True), _settings(tmp_path, **kw), state, state.step, progress=False,
                      stop_after=stop_after)
    return state, result


def test_interrupted_and_resumed_equals_uninterrupted(tmp_path):
    full, full_result = _run(tmp_path / "a")
    _, first = _run(tmp_path / "b", stop_after=5)
    assert first.steps == 5 and [p.name for p in ckpt.list_checkpoints(tmp_path / "b/checkpoints")] == \
        ["step-0000004", "step-0000005"]
    resumed, result = _run(tmp_path / "b")
    assert result.resumed_from == 5 and full_result.resumed_from is None
    assert torch.equal(full.w, resumed.w)
    assert result.last == full_result.last and result.last["step"] == 12
    log_a, log_b = ((tmp_path / p / "metrics.jsonl").read_text() for p in ("a", "b"))
    assert log_a == log_b and [json.loads(ln)["step"] for ln in log_a.splitlines()] == list(range(1, 13))
    # Nothing left to do: the summary comes from the checkpoint.
    _, again = _run(tmp_path / "b")
    assert again.resumed_from == 12 and again.last == full_result.last


def test_other_params_start_afresh(tmp_path):
    _run(tmp_path, stop_after=4)
    _, result = _run(tmp_path, fp="other")
    assert result.resumed_from is None and result.steps == 12


def test_divergence_stops_every_rank_and_keeps_only_finite_checkpoints(tmp_path):
    with pytest.raises(TrainingDiverged, match=r"non-finite loss = inf at step 7.*Last good checkpoint: .*step-0000004"
                                               r".*Lower toy\.lr\."):
        _run(tmp_path, state=Regression(blow_up_at=6))
    kept = ckpt.list_checkpoints(tmp_path / "checkpoints")
    assert [p.name for p in kept] == ["step-0000004"]
    rows = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 8 and rows[-2]["loss"] == "inf"  # the evidence is logged


def test_weights_are_checked_before_every_checkpoint(tmp_path):
    with pytest.raises(TrainingDiverged, match="non-finite weights by step 8"):
        _run(tmp_path, state=Regression(poison_weights_at=5))
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "checkpoints")] == ["step-0000004"]


def test_fingerprint_ignores_bookkeeping_only():
    base = config.load(PARAMS)
    same = config.load(PARAMS, ["distill.log_every=3", "distill.checkpoint_every=7", "distill.eval_samples=0",
                                "distill.compile=true", "teacher_ft.log_every=1", "evaluate.n=10"])
    assert fingerprint(base, "distill") == fingerprint(same, "distill")
    assert fingerprint(base, "model", "teacher_ft") == fingerprint(same, "model", "teacher_ft")
    assert fingerprint(base, "distill") != fingerprint(config.load(PARAMS, ["distill.lr=1e-3"]), "distill")
    assert fingerprint(base, "model", "teacher_ft") != fingerprint(config.load(PARAMS, ["model.channels=[32, 32]"]),
                                                                   "model", "teacher_ft")


def test_changed_params_remove_stale_checkpoints_and_the_new_run_resumes(tmp_path):
    """A stale run's higher-numbered checkpoints must not outlive a params change (they used to, and each save
    of the new run then pruned its own checkpoint instead)."""
    _run(tmp_path, total=40, every=10)  # stale: step-30, step-40
    _, first = _run(tmp_path, fp="new", stop_after=4)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "checkpoints")] == ["step-0000004"]
    fresh, _ = _run(tmp_path / "fresh", fp="new")
    resumed, result = _run(tmp_path, fp="new")
    assert result.resumed_from == 4 and torch.equal(resumed.w, fresh.w)


def test_a_torn_log_line_does_not_block_the_resume(tmp_path, capsys):
    full, _ = _run(tmp_path / "a")
    _run(tmp_path / "b", stop_after=5)
    with (tmp_path / "b/metrics.jsonl").open("a") as f:
        f.write('{"step": 6, "loss": 0.1')  # a flush cut short (disk full, kill)
    resumed, result = _run(tmp_path / "b")
    assert result.resumed_from == 5 and torch.equal(full.w, resumed.w)
    assert (tmp_path / "a/metrics.jsonl").read_text() == (tmp_path / "b/metrics.jsonl").read_text()
    out, err = capsys.readouterr()
    assert "line 6 is not a log row" in err and "resuming from" in err and out == ""  # status lines: stderr


# -- progress lines without bars (issue 18 case 8) ------------------------------------------------------------------
def test_progress_lines_name_step_total_losses_and_eta(tmp_path, capfd, monkeypatch):
    import re

    monkeypatch.setenv("TDM_PROGRESS_EVERY", "0")  # a line at every log flush
    _run(tmp_path / "a", total=7, log_every=2)  # flushes at 2, 4, 6 and the last step, 7
    out, err = capfd.readouterr()
    lines = [ln for ln in err.splitlines() if ln.startswith("toy: ")]
    assert out == ""  # stdout carries the stage's JSON result only
    assert [ln.split()[1] for ln in lines] == ["2/7", "4/7", "6/7", "7/7"]
    for line in lines:
        assert re.fullmatch(r"toy: \d/7 step \(\d+%\) loss=\S+ \| \d+ s elapsed, ETA \d+ s", line), line
    assert lines[-1].endswith("ETA 0 s") and "(100%)" in lines[-1]
    rows = [json.loads(r) for r in (tmp_path / "a/metrics.jsonl").read_text().splitlines()]
    assert lines[0].split()[4] == f"loss={rows[1]['loss']:.4g}"  # the losses of the flush just made
    # A resumed run counts from where it resumed; the default (unset) prints no line; bad values fail naming it.
    _run(tmp_path / "b", total=8, log_every=2, stop_after=4)
    _run(tmp_path / "b", total=8, log_every=2)
    assert [ln.split()[1] for ln in capfd.readouterr().err.splitlines() if ln.startswith("toy: ")][-2:] == \
        ["6/8", "8/8"]
    monkeypatch.setenv("TDM_PROGRESS_EVERY", "3600")  # at most one an hour: the first and the last
    _run(tmp_path / "c", total=8, log_every=2)
    assert [ln.split()[1] for ln in capfd.readouterr().err.splitlines() if ln.startswith("toy: ")] == ["2/8", "8/8"]
    monkeypatch.delenv("TDM_PROGRESS_EVERY")
    _run(tmp_path / "d", total=4, log_every=2)
    assert "toy: " not in capfd.readouterr().err
    for bad in ("-1", "soon", "nan"):
        monkeypatch.setenv("TDM_PROGRESS_EVERY", bad)
        with pytest.raises(ValueError, match="TDM_PROGRESS_EVERY"):
            _run(tmp_path / "e", total=2)


def test_durations_read_as_a_person_would():
    from tdm.training import duration

    assert [duration(s) for s in (0.4, 12, 65, 3599, 3725)] == ["0 s", "12 s", "1 min 05 s", "59 min 59 s",
                                                                  "1 h 02 min"]


def test_progress_lines_serve_any_loop_without_a_bar(capfd, monkeypatch):
    from tdm.training import ProgressLines

    monkeypatch.setenv("TDM_PROGRESS_EVERY", "0")
    lines = ProgressLines("sample", "batch", total=4)
    for n in range(1, 5):
        lines.update(n)
    err = capfd.readouterr().err.splitlines()
    assert [ln.split(" | ")[0] for ln in err] == ["sample: 1/4 batch (25%)", "sample: 2/4 batch (50%)",
                                                  "sample: 3/4 batch (75%)", "sample: 4/4 batch (100%)"]
    monkeypatch.setenv("TDM_PROGRESS_EVERY", "3600")
    lines = ProgressLines("sample", "batch", total=4, main_process=False)  # other processes stay quiet
    lines.update(4)
    assert capfd.readouterr().err == ""
