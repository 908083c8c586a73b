"""One writer per stage folder, outputs checked writable before any model loads, write failures as one line
(issue 18 cases 12 and 15; tdm/outputs.py)."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tdm.cli import main
from tdm.outputs import OutputError, OutputLocked, check_writable, lock_path, read_holder, stage_lock, write_error

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
ENV = {**os.environ, "TDM_MLFLOW": "0", "PYTHONPATH": str(REPO)}
TINY = ["-S", "model.channels=[32, 32]", "-S", "teacher_ft.batch_size=8", "-S", "teacher_ft.eval_samples=0"]


@pytest.fixture
def project(tmp_path, monkeypatch):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _wait_for_holder(out_dir: Path, proc: subprocess.Popen, timeout: float = 120) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        holder = read_holder(out_dir)
        if holder is not None and holder.get("pid") == proc.pid:
            return holder
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    raise AssertionError("the first run never took the lock")


def _holder_process(out_dir: Path) -> subprocess.Popen:
    """A process that takes the stage lock and sleeps (a stand-in for a long run)."""
    code = ("import sys, time\nfrom tdm.outputs import stage_lock\n"
            f"with stage_lock({str(out_dir)!r}):\n    time.sleep(600)\n")
    return subprocess.Popen([PY, "-c", code], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_a_second_stage_run_fails_at_once_naming_the_first(project, capsys, monkeypatch):
    """Two real `tdm teacher-ft` runs on one folder: the second exits 2 in one line naming the first's pid and
    host, before it builds a model or writes anything; the first keeps running."""
    from tdm import teacher_ft

    def boom(*args, **kwargs):
        raise AssertionError("the second run built a model")

    monkeypatch.setattr(teacher_ft, "build_backbone", boom)
    first = subprocess.Popen([PY, "-m", "tdm.cli", "teacher-ft", "-q", *TINY, "-S", "teacher_ft.steps=100000"],
                             cwd=project, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_for_holder(project / "outputs" / "teacher_ft", first)
        before = sorted(p.name for p in (project / "outputs" / "teacher_ft").glob("*")) \
            if (project / "outputs" / "teacher_ft").exists() else []
        assert main(["teacher-ft", "-q", *TINY, "-S", "teacher_ft.steps=3"]) == 2
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.startswith("tdm: error:")]
        assert len(lines) == 1 and "Traceback" not in err
        assert f"pid {first.pid} on {socket.gethostname()}" in lines[0]
        assert "outputs/teacher_ft" in lines[0] and "tdm teacher-ft -q" in lines[0]
        assert first.poll() is None  # the first run is untouched
        if before:
            assert sorted(p.name for p in (project / "outputs" / "teacher_ft").glob("*")) >= before
    finally:
        first.kill()
        first.wait()


def test_every_stage_command_takes_its_folder_lock(project, capsys, teacher_dir):
    """distill, evaluate, lora-transfer and report refuse to start while their folder is held."""
    held = {"distill": ["distill", "-S", f"distill.teacher={teacher_dir}"],
            "evaluate": ["evaluate", "-S", f"evaluate.teacher={teacher_dir}", "-S", "evaluate.student=null"],
            "report": ["report"]}
    for stage, argv in held.items():
        out_dir = Path("outputs") / stage
        with stage_lock(out_dir):
            assert main(argv) == 2, stage
        line = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("tdm: error:")]
        assert len(line) == 1 and f"pid {os.getpid()}" in line[0], (stage, line)
        assert not (project / "outputs" / stage).exists()


def test_a_lock_left_by_a_killed_run_is_taken_over_with_a_note(project, capsys):
    out_dir = project / "outputs" / "distill"
    holder = _holder_process(out_dir)
    _wait_for_holder(out_dir, holder)
    with pytest.raises(OutputLocked, match=f"pid {holder.pid}"):
        with stage_lock(out_dir):
            pass
    holder.send_signal(signal.SIGKILL)  # the kernel drops its lock; its holder record stays behind
    holder.wait()
    assert read_holder(out_dir)["pid"] == holder.pid
    with stage_lock(out_dir):
        assert read_holder(out_dir)["pid"] == os.getpid()
    err = capsys.readouterr().err
    assert f"tdm: note: {out_dir}: taking over" in err and f"pid {holder.pid}" in err and "no longer running" in err
    assert read_holder(out_dir) is None  # released cleanly: no record left
    with stage_lock(out_dir):  # and no note the next time
        pass
    assert "taking over" not in capsys.readouterr().err


def test_the_lock_sits_beside_the_stage_folder_not_in_it(project):
    """DVC caches the stage folders: a lock inside one would be cached (and restored) with it."""
    assert lock_path(Path("outputs/distill")) == Path("outputs/.locks/distill.lock")
    with stage_lock(Path("outputs/distill")):
        assert not Path("outputs/distill").exists()


def _tree(root: Path) -> dict:
    return {str(p): (p.stat().st_mtime_ns, p.is_dir()) for p in [root, *root.rglob("*")]}


def test_taking_the_lock_removes_temps_a_killed_write_left(tmp_path, capsys):
    """evaluate's sample files change names between runs, so a temp of one a kill left is never rewritten under
    its name: the one writer sweeps the whole folder when it takes the lock (what a live writer holds stays)."""
    out = tmp_path / "outputs" / "evaluate"
    (out / "sub").mkdir(parents=True)
    stale = [out / ".samples_student_s4.npz.tmp-abc12345.npz", out / "sub" / ".model.tmp-x1y2z3w4"]
    stale[0].write_bytes(b"half")
    stale[1].mkdir()
    mine = out / "notes.txt"
    mine.write_text("kept")
    with stage_lock(out, "evaluate"):
        assert not any(p.exists() for p in stale) and mine.read_text() == "kept"
    assert "left by an interrupted write" in capsys.readouterr().err


def test_check_writable_creates_and_touches_nothing(tmp_path):
    (tmp_path / "outputs" / "distill" / "checkpoints" / "step-0000010").mkdir(parents=True)
    (tmp_path / "a_file").write_text("x")
    before = _tree(tmp_path)
    check_writable(files=[tmp_path / "metrics" / "distill.json"], folders=[tmp_path / "outputs" / "distill",
                                                                            tmp_path / "outputs" / "new"])
    for files, folders, named, why in [
        ([tmp_path / "a_file" / "m.json"], [], "a_file/m.json", "is a file, not a folder"),
        ([], [tmp_path / "a_file"], "a_file", "a file is in the way"),
        ([tmp_path / "outputs" / "distill"], [], "outputs/distill", "is a folder"),
        ([], [tmp_path / "a_file" / "deep" / "er"], "a_file/deep/er", "is a file, not a folder"),
    ]:
        with pytest.raises(OutputError, match="cannot write .*" + named) as err:
            check_writable(files, folders)
        assert why in str(err.value)
    assert _tree(tmp_path) == before


NOBODY = 65534


def _as_unprivileged(script: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run `script` as an unprivileged user (root ignores permission bits, so a read-only folder is only
    read-only to someone else); as that user already when not root."""
    prefix = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("root without setpriv: no unprivileged user to run as")
        prefix = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    env = {**ENV, "HOME": str(cwd)}
    return subprocess.run([*prefix, PY, "-c", script], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_read_only_outputs_metrics_and_checkpoints_fail_before_any_model_loads(teacher_dir):
    """A read-only outputs/, metrics/ or outputs/distill/checkpoints/: one `cannot write` line, exit 2, before
    any model loads (the models would load in seconds here; a tripwire makes sure they do not)."""
    base = Path(tempfile.mkdtemp(prefix="tdm_ro_"))
    try:
        os.chmod(base, 0o755)
        shutil.copytree(teacher_dir, base / "teacher")
        cases = {"outputs": ["report"], "metrics": ["distill", "-S", f"distill.teacher={base / 'teacher'}"],
                 "outputs/distill/checkpoints": ["distill", "-S", f"distill.teacher={base / 'teacher'}"]}
        for f in [base / "teacher", *(base / "teacher").rglob("*")]:
            os.chmod(f, 0o755 if f.is_dir() else 0o644)
        for i, (read_only, argv) in enumerate(cases.items()):
            proj = base / f"p{i}"
            (proj / read_only).mkdir(parents=True)
            shutil.copy(REPO / "params.yaml", proj / "params.yaml")
            for d in [proj, *proj.rglob("*")]:
                os.chmod(d, 0o777 if d.is_dir() else 0o666)
            os.chmod(proj / read_only, 0o555)
        script = ("import io, json, contextlib, os, sys\n"
                  "from tdm.backbones.digits import DigitsBackbone\n"
                  "def boom(*a, **k): raise AssertionError('a model was loaded')\n"
                  "DigitsBackbone.load = classmethod(boom)\n"
                  "from tdm.cli import main\nout = []\n"
                  f"for i, argv in enumerate({list(cases.values())!r}):\n"
                  f"    os.chdir({str(base)!r} + f'/p{{i}}')\n"
                  "    err = io.StringIO()\n"
                  "    with contextlib.redirect_stderr(err):\n"
                  "        code = main(argv)\n"
                  "    out.append([code, err.getvalue()])\n"
                  "print(json.dumps(out))\n")
        done = _as_unprivileged(script, base)
        assert done.returncode == 0, done.stderr
        results = json.loads(done.stdout.strip().splitlines()[-1])
        for (read_only, _), (code, err) in zip(cases.items(), results):
            lines = [ln for ln in err.splitlines() if ln.startswith("tdm: error:")]
            assert code == 2 and len(lines) == 1 and "Traceback" not in err, (read_only, err)
            assert lines[0].startswith("tdm: error: cannot write ") and read_only in lines[0], lines[0]
            assert "not writable (permission denied)" in lines[0]
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_a_write_failing_mid_run_is_one_line_not_a_traceback(project):
    """A checkpoint save that fails (here: a file-size limit, the OS refusing the write as it does on a full disk)
    ends the stage with `tdm: error: cannot write <path>: <reason>` and exit code 2."""
    script = ("import resource, signal, sys\n"
              "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
              "resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))\n"
              "from tdm.cli import main\n"
              f"sys.exit(main(['teacher-ft', '-q', *{TINY!r}, '-S', 'teacher_ft.steps=3', "
              "'-S', 'teacher_ft.checkpoint_every=1']))\n")
    done = subprocess.run([PY, "-c", script], cwd=project, env=ENV, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in done.stderr.splitlines() if ln.startswith("tdm: error:")]
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and re.fullmatch(r"tdm: error: cannot write outputs/teacher_ft/checkpoints/step-\d+: "
                                            r"File too large", lines[0]), done.stderr  # the output it was writing
    assert "Traceback" not in done.stderr


def test_an_unreadable_model_file_is_a_read_error_not_a_write_error(teacher_dir):
    """A permission error on an input names it as unreadable (not `cannot write`)."""
    base = Path(tempfile.mkdtemp(prefix="tdm_unreadable_"))
    try:
        os.chmod(base, 0o777)
        shutil.copytree(teacher_dir, base / "teacher")
        for f in [base / "teacher", *(base / "teacher").rglob("*")]:
            os.chmod(f, 0o755 if f.is_dir() else 0o644)
        weights = base / "teacher" / "unet" / "diffusion_pytorch_model.safetensors"
        os.chmod(weights, 0o600)  # root's alone
        shutil.copy(REPO / "params.yaml", base / "params.yaml")
        os.chmod(base / "params.yaml", 0o644)
        if os.geteuid() != 0:
            pytest.skip("needs root to make a file only another user can read")
        script = ("import sys\nfrom tdm.cli import main\n"
                  f"sys.exit(main(['distill', '-S', 'distill.teacher={base / 'teacher'}']))\n")
        done = _as_unprivileged(script, base)
        lines = [ln for ln in done.stderr.splitlines() if ln.startswith("tdm: error:")]
        assert done.returncode == 2 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
        assert f"cannot read {weights}: Permission denied" in lines[0] and "distill.teacher" in lines[0]
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_write_error_reads_real_os_failures(tmp_path):
    with pytest.raises(OSError) as full:
        with open("/dev/full", "w") as f:  # the kernel's always-full device: ENOSPC on flush
            f.write("x")
    assert str(write_error(full.value, tmp_path / "out")) == f"cannot write {tmp_path / 'out'}: No space left on device"
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(OSError) as in_the_way:
        (tmp_path / "a_file" / "sub").mkdir()
    assert str(write_error(in_the_way.value)) == f"cannot write {tmp_path / 'a_file' / 'sub'}: Not a directory"
    with pytest.raises(FileNotFoundError) as missing:
        open(tmp_path / "nope.txt")
    assert write_error(missing.value) is None  # a missing input is not a write failure
    assert write_error(RuntimeError("shape mismatch")) is None
