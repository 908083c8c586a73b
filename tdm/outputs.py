"""What a stage writes: one writer per output folder (`stage_lock`), every output path checked writable before
any model loads (`check_writable`), and OS write failures as one line (`write_error`).

The lock. `filelock.FileLock` (already a dependency of torch, diffusers and huggingface_hub) holds an OS lock
(flock) on `outputs/.locks/<stage>.lock`. The kernel drops it the moment its process dies, however it dies
(SIGKILL, OOM, a lost session), so a lock can never outlive its holder and no guess about staleness (lock age,
pid reuse) is ever needed. The lock file itself carries nothing (filelock truncates it on open), so the holder
names itself in a record beside it, `<stage>.lock.holder` (pid, host, start time, command), written once the
lock is held and removed on release. A second run fails at once with `OutputLocked` naming that record's
holder. A record left by a killed run (its holder died holding the lock, so nobody removed it) is found by the
next run that takes the lock; it takes over with a one-line note naming the dead holder.
Why not `filelock.SoftFileLock` (pid + host in the lock file, dead pids broken): it judges liveness by pid and
host name, which a container restart or pid reuse fools, and its holder format is private to filelock; why
not flufl.lock / zc.lockfile (both installed for DVC): the first expires locks by age, the second does what
FileLock does with less control over the holder record. The lock sits beside the stage folders, not in them:
DVC caches the stage folders and would cache the lock.

Writability. `check_writable(paths)` walks each path a stage will write (its output folder, its metrics file,
the metric-weights cache) without creating or touching anything: the nearest existing ancestor must be a
folder this process may write (`os.access`, which also sees read-only mounts, even as root), nothing in the
way may be a file where a folder goes (or the reverse), and every existing folder under an output folder
(checkpoints, models, which are replaced or pruned) must be writable too.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator

LOCK_DIR = ".locks"


class OutputError(OSError):
    """An output path cannot be written: `cannot write <path>: <reason>` (exit code 2)."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"cannot write {path}: {reason}")
        self.path, self.reason = str(path), reason

    def __str__(self) -> str:
        return self.args[0]


class OutputLocked(RuntimeError):
    """Another live tdm process holds the stage's output folder (exit code 2: run one at a time)."""


# -- writability --------------------------------------------------------------------------------------------------
def _nearest_existing(path: Path) -> tuple[Path, list[Path]]:
    """The nearest existing ancestor of `path` (or `path`), and the missing parts below it (outermost first)."""
    missing = []
    while not os.path.lexists(path):
        missing.insert(0, path)
        if path.parent == path:
            break
        path = path.parent
    return path, missing


def _dir_writable(folder: Path, target: Path) -> None:
    if not os.access(folder, os.W_OK | os.X_OK):
        reason = "read-only file system" if _read_only_mount(folder) else "permission denied"
        raise OutputError(target, f"{folder} is not writable ({reason})")


def _read_only_mount(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def check_writable(files: Iterable[str | Path] = (), folders: Iterable[str | Path] = ()) -> None:
    """Check, without creating or changing anything, that every `files` path (a file the stage writes, replaced
    atomically) and every `folders` path (a folder the stage fills, with every folder already under it) can be
    written. Raises OutputError naming the first path that cannot, and why."""
    for target, is_dir in [*((Path(d), True) for d in folders), *((Path(f), False) for f in files)]:
        existing, missing = _nearest_existing(target)
        if missing:  # created: the nearest existing ancestor must be a folder we may write
            if not existing.is_dir():
                raise OutputError(target, f"{existing} is a file, not a folder")
            _dir_writable(existing, target)
            continue
        if is_dir:
            if not target.is_dir():
                raise OutputError(target, "a file is in the way (a folder goes there)")
            _dir_writable(target, target)
            for root, dirs, _ in os.walk(target):  # replaced models, pruned checkpoints: their folders too
                for d in dirs:
                    sub = Path(root) / d
                    if not sub.is_symlink():
                        _dir_writable(sub, target)
        else:
            if target.is_dir():
                raise OutputError(target, "is a folder (a file goes there)")
        if target.parent != target:
            _dir_writable(target.parent, target)  # atomic replacement writes a sibling, then renames


# OS errors that mean "this path cannot be written" (full disk, quota, read-only, permissions, a file in the way).
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.ENOTDIR,
                errno.EISDIR, errno.EEXIST, errno.ENOTEMPTY, errno.EXDEV, errno.EMLINK, errno.ENAMETOOLONG}
# The same failures as other libraries word them (torch.save's RuntimeError, safetensors' SafetensorError).
_WRITE_TEXTS = {"No space left on device": "No space left on device", "StorageFull": "No space left on device",
                "os error 28": "No space left on device", "Disk quota exceeded": "Disk quota exceeded",
                "File too large": "File too large", "FileTooLarge": "File too large",
                "os error 27": "File too large", "Read-only file system": "Read-only file system",
                "ReadOnlyFilesystem": "Read-only file system", "file write failed": "the write failed",
                "PytorchStreamWriter": "the write failed", "inline_container.cc": "the write failed",
                "Permission denied": "Permission denied", "PermissionDenied": "Permission denied"}


def write_error(err: BaseException, fallback: str | Path | None = None) -> OutputError | None:
    """`err` as an OutputError when it is a failed write (an OSError of WRITE_ERRNOS, or torch / safetensors
    wording the same), naming its path (`fallback`, e.g. the stage's output folder, when the error names
    none); None when it is something else."""
    if isinstance(err, OutputError):
        return err
    if isinstance(err, OSError) and not isinstance(err, FileNotFoundError):
        if err.errno in (errno.EACCES, errno.EPERM) and err.filename and os.path.exists(err.filename) \
                and not os.access(err.filename, os.R_OK):
            return None  # a file we may not read: an input, not an output
        if err.errno in WRITE_ERRNOS:
            path = err.filename or fallback or "output"
            return OutputError(path, err.strerror or str(err))
        return None
    if isinstance(err, RuntimeError) or type(err).__name__ == "SafetensorError":
        text = str(err)
        for needle, reason in _WRITE_TEXTS.items():
            if needle in text:
                return OutputError(fallback or "output", reason)
    return None


# -- the lock -----------------------------------------------------------------------------------------------------
def lock_path(out_dir: str | Path) -> Path:
    """outputs/.locks/<stage>.lock for the stage folder outputs/<stage>."""
    out_dir = Path(out_dir)
    return out_dir.parent / LOCK_DIR / f"{out_dir.name}.lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(holder: dict) -> str:
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {when}"
            + (f": {holder['command']}" if holder.get("command") else ""))


def read_holder(out_dir: str | Path) -> dict | None:
    """The holder record of a stage folder's lock, or None (no record, or an unreadable one)."""
    path = lock_path(out_dir).with_name(lock_path(out_dir).name + ".holder")
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


@contextlib.contextmanager
def stage_lock(out_dir: str | Path, stage: str | None = None) -> Iterator[Path]:
    """Hold the one-writer lock of the stage folder `out_dir` for the block. Raises OutputLocked at once (no
    waiting) naming the live holder (pid, host, start time, command) when another process holds it, and
    OutputError when the lock cannot be created. A holder record left by a killed run is taken over with a
    note on stderr."""
    from filelock import FileLock, Timeout

    out_dir = Path(out_dir)
    name = stage or out_dir.name
    path = lock_path(out_dir)
    holder_file = path.with_name(path.name + ".holder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise write_error(err, path.parent) or OutputError(path.parent, err.strerror or str(err)) from None
    lock = FileLock(str(path), timeout=0, is_singleton=False)
    try:
        lock.acquire()
    except Timeout:
        holder = read_holder(out_dir)
        who = _describe(holder) if holder else "another process (it has not named itself yet)"
        raise OutputLocked(f"{out_dir}: another tdm {name} run is writing here ({who}); wait for it to end or "
                           f"stop it, then rerun (lock: {path})") from None
    except OSError as err:
        raise write_error(err, path) or OutputError(path, err.strerror or str(err)) from None
    try:
        stale = read_holder(out_dir)
        if stale is not None:
            alive = isinstance(stale.get("pid"), int) and stale.get("host") == socket.gethostname() \
                and _pid_alive(stale["pid"])
            print(f"tdm: note: {out_dir}: taking over the lock of a run that ended without releasing it "
                  f"({_describe(stale)}{'' if alive else ', no longer running'})", file=sys.stderr)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                  "command": " ".join(["tdm", *sys.argv[1:]]) if sys.argv and sys.argv[0].endswith(("tdm", "cli.py"))
                  else " ".join(sys.argv)}
        tmp = holder_file.with_name(f".{holder_file.name}.{os.getpid()}")
        try:
            tmp.write_text(json.dumps(record))
            os.replace(tmp, holder_file)
        except OSError as err:
            raise write_error(err, holder_file) or OutputError(holder_file, err.strerror or str(err)) from None
        # The one writer now: temps a killed write left anywhere in the folder go (outputs whose names change
        # between runs, e.g. evaluate's sample files, are never rewritten under the same name).
        from tdm.artifacts import remove_stale_temps

        remove_stale_temps(out_dir, recursive=True)
        yield path
    finally:
        with contextlib.suppress(OSError):
            if (read_holder(out_dir) or {}).get("pid") == os.getpid():
                holder_file.unlink()
        lock.release()


__all__ = ["OutputError", "OutputLocked", "check_writable", "write_error", "stage_lock", "lock_path",
           "read_holder", "WRITE_ERRNOS"]
