"""Files the stages leave behind: sample archives (npz + PNG grid) and metrics JSON, written atomically."""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

try:
    import fcntl
except ImportError:  # not POSIX: stale temps are never removed
    fcntl = None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Temps are named `.<name>.tmp-<random>` (`.<name>.old-<random>` for the folder moved aside) and their writer
# holds an exclusive flock on them while it writes. The kernel drops the lock when the writer dies, even by
# SIGKILL, so a temp nobody holds a lock on is one a killed write left: it would otherwise stay forever (and land
# in DVC's cache and remote). The next write of that output, and the start of its stage, remove such temps.
_TEMP = re.compile(r"^\.(?P<name>.+?)\.(?:tmp|old)-[a-z0-9_]{8}(?:\.[^.]*)?$")


def _lock(fd: int) -> None:
    """An exclusive flock on `fd`; none where the file system has no flock (then `in_use` is always True)."""
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass


def _hold(path: str | Path) -> int:
    """Open `path` (a file or a folder) and take an exclusive lock on it; close the fd to release it."""
    fd = os.open(path, os.O_RDONLY)
    _lock(fd)
    return fd


def in_use(path: str | Path) -> bool:
    """True while a live writer holds its lock on temp `path` (or when that cannot be told)."""
    if fcntl is None:
        return True
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def _remove(path: Path) -> None:
    print(f"tdm: removed {path} (left by an interrupted write)", file=sys.stderr, flush=True)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_stale_temps(folder: str | Path, name: str | None = None, recursive: bool = False) -> list[Path]:
    """Remove the temps in `folder` (those of output `name` only, if given; in every subfolder too with
    `recursive`) that a killed write left: no live writer holds them. Each with a one-line note on stderr. Also
    the unmarked temps of output `name` that earlier versions left (`.<name>.<8 random chars>`, `.<name>.old.<8>`)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    legacy = re.compile(rf"^\.{re.escape(name)}\.(?:old\.)?[a-z0-9_]{{8}}(?:{re.escape(Path(name).suffix)})?$") \
        if name else None
    removed, subfolders = [], []
    for p in sorted(folder.iterdir()):
        m = _TEMP.match(p.name)
        ours = (m is not None and (name is None or m["name"] == name)) or (legacy is not None and legacy.match(p.name))
        if ours and not in_use(p):
            _remove(p)
            removed.append(p)
        elif recursive and m is None and p.is_dir() and not p.is_symlink():
            subfolders.append(p)
    for sub in subfolders:
        removed += remove_stale_temps(sub, name, recursive=True)
    return removed


def _atomic_write(path: Path, write) -> Path:
    """Write a file beside `path` and rename it into place (mkstemp's 0600 widened to the umask's default)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent, path.name)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=path.suffix, dir=path.parent)
    try:
        _lock(fd)
        write(tmp)
        fault_point("atomic_write", path.name)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        _raise_as_write_error(err, path)
        raise
    finally:
        os.close(fd)
    return path


def _raise_as_write_error(err: BaseException, path: Path) -> None:
    """A failed write (disk full, read-only, file too large; OSError or torch / safetensors wording) raised as
    `tdm.outputs.OutputError` naming the output `path` it was for; anything else is left to propagate."""
    from tdm.outputs import OutputError, write_error

    if isinstance(err, Exception) and not isinstance(err, OutputError):
        converted = write_error(err, path)
        if converted is not None:
            raise converted from err


def atomic_write_file(path: str | Path, write) -> Path:
    """`write(tmp_path)` then rename to `path`: readers never see a half-written file."""
    return _atomic_write(Path(path), write)


@contextlib.contextmanager
def atomic_folder(folder: str | Path) -> Iterator[Path]:
    """Yield a temp folder beside `folder`; on success it replaces `folder` (the old one is moved aside first,
    so a crash at any point leaves either the old or the new folder complete); on error it is removed. Temps
    a killed write left beside `folder` are removed first."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(folder.parent, folder.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    held, old = [_hold(tmp)], None
    try:
        yield tmp
        fault_point("atomic_folder", folder.name)
        os.chmod(tmp, 0o777 & ~_umask())
        if folder.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
            held.append(_hold(old))
            os.rename(folder, old / folder.name)
            fault_point("atomic_swap", folder.name)
        os.rename(tmp, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as err:
        if old is not None and (old / folder.name).exists() and not folder.exists():
            os.rename(old / folder.name, folder)  # an error mid-swap: the old folder goes back
        if old is not None and not (old / folder.name).exists():
            shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
        _raise_as_write_error(err, folder)
        raise
    finally:
        for fd in held:
            os.close(fd)


_faults: dict[str, int] = {}


def fault_point(name: str, target: str = "") -> None:
    """Fault-injection hook for tests/integration/test_fault_injection.py, inert unless TDM_FAULT_AT is set:
    `TDM_FAULT_AT=<name>[@<target>][:<n>]` SIGKILLs this process the n-th time (default 1st) it reaches point
    `name` (for that target file or folder name). Points: atomic_write (a file's temp written, not renamed yet),
    atomic_folder (a folder's temp written), atomic_swap (the old folder moved aside, the new one not in place
    yet), iteration and log_flush (tdm.training.run_loop)."""
    spec = os.environ.get("TDM_FAULT_AT")
    if not spec:
        return
    where, _, n = spec.partition(":")
    point, _, want = where.partition("@")
    if point != name or (want and want != target):
        return
    _faults[where] = _faults.get(where, 0) + 1
    if _faults[where] == int(n or 1):
        os.kill(os.getpid(), signal.SIGKILL)


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")


def weights_digest(folder: str | Path, chunks: int = 16, chunk_bytes: int = 1 << 16) -> str:
    """An identity of the model weights under `folder` (recursive, symlinks followed as in the HF cache): each
    weight file's relative path, size, and `chunks` evenly spaced 64 KiB samples of its bytes (all of it when
    smaller). Sampled, so it costs milliseconds for a multi-GB checkpoint: it tells a retrained or replaced
    model from the one a checkpoint was made on (training rewrites essentially every byte), it is not an
    integrity check against targeted edits."""
    import hashlib

    h = hashlib.sha256()
    folder = Path(folder)
    for f in sorted(p for p in folder.rglob("*") if p.suffix in WEIGHT_SUFFIXES and p.is_file()):
        size = f.stat().st_size
        h.update(f"{f.relative_to(folder)}\0{size}\0".encode())
        with f.open("rb") as fh:
            if size <= chunks * chunk_bytes:
                h.update(fh.read())
                continue
            for i in range(chunks):
                fh.seek((size - chunk_bytes) * i // (chunks - 1))
                h.update(fh.read(chunk_bytes))
    return h.hexdigest()[:16]


def write_json(path: str | Path, obj) -> Path:
    """Strict JSON (a NaN is a bug upstream, not a value to write)."""
    text = json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n"
    return _atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text))


def image_grid(images: torch.Tensor | np.ndarray, ncol: int | None = None, scale: int = 1, pad: int = 1) -> np.ndarray:
    """uint8 (N, H, W, C) -> one uint8 grid image (rows of `ncol`), each image upscaled by `scale` (nearest)."""
    images = np.asarray(images)
    n, h, w, c = images.shape
    ncol = ncol or math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    if scale > 1:
        images = images.repeat(scale, axis=1).repeat(scale, axis=2)
        h, w = h * scale, w * scale
    grid = np.zeros((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), dtype=np.uint8)
    for i, im in enumerate(images):
        r, col = divmod(i, ncol)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = im
    return grid


def save_samples(path: str | Path, images: torch.Tensor | np.ndarray, prompts: Sequence[str],
                 grid_size: int = 100, **meta) -> tuple[Path, Path]:
    """Write `images` (uint8 N x H x W x C, or videos N x F x H x W x C) and `prompts` to an npz, and a PNG grid
    of the first `grid_size` beside it (videos: one row per sample of up to 8 evenly spaced frames)."""
    from PIL import Image

    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim not in (4, 5):
        raise ValueError(f"samples must be uint8 N x H x W x C (or N x F x H x W x C videos), "
                         f"got {images.dtype} {images.shape}")
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts for {len(images)} images")
    path = Path(path)
    extra = {k: np.asarray(v) for k, v in meta.items()}
    _atomic_write(path, lambda tmp: np.savez_compressed(tmp, images=images, prompts=np.asarray(prompts, dtype=str), **extra))
    if images.ndim == 5:  # a contact sheet: sample i's frames along row i
        videos = images[:min(grid_size, 16)]
        frames = np.linspace(0, images.shape[1] - 1, min(8, images.shape[1])).round().astype(int)
        grid = image_grid(videos[:, frames].reshape(-1, *images.shape[2:]), ncol=len(frames),
                          scale=max(1, 64 // images.shape[2]))
    else:
        grid = image_grid(images[:grid_size], scale=max(1, 64 // images.shape[1]))
    png = path.with_suffix(".png")
    _atomic_write(png, lambda tmp: Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(tmp, format="PNG"))
    return path, png


def load_samples(path: str | Path) -> tuple[np.ndarray, list[str]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"samples file not found: {path}")
    with np.load(path, allow_pickle=False) as z:
        if "images" not in z or "prompts" not in z:
            raise ValueError(f"{path}: expected arrays 'images' and 'prompts', found {list(z.keys())}")
        return z["images"], [str(p) for p in z["prompts"]]
