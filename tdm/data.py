"""Data the stages read: the embedded digits set, prompt files, image-caption and video-caption folders.

Distillation reads prompts only (data-free); teacher fine-tuning and FID read images.
"""
from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Several phrasings so the text encoder, not a fixed template, carries the class.
PROMPT_TEMPLATES = (
    "a handwritten digit {word}",
    "the number {word}, written by hand",
    "a scan of a handwritten {word}",
    "an 8x8 picture of the digit {word}",
)

_WORD_TO_LABEL = {w: i for i, w in enumerate(DIGIT_WORDS)}
_WORD_RE = re.compile(r"\b(" + "|".join(DIGIT_WORDS) + r")\b")


def digit_prompt(label: int, template: int = 0) -> str:
    return PROMPT_TEMPLATES[template % len(PROMPT_TEMPLATES)].format(word=DIGIT_WORDS[int(label)])


def label_from_prompt(prompt: str) -> int | None:
    """The digit a prompt asks for, or None when it names none (or several)."""
    found = set(_WORD_RE.findall(prompt.lower()))
    return _WORD_TO_LABEL[found.pop()] if len(found) == 1 else None


def digits_split(split: str, test_fraction: float = 0.25, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled 8x8 digits as (images N x 1 x 8 x 8 in [-1, 1], labels N).

    The split is stratified and fixed by `seed`, so every stage and metric sees the same held-out set.
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"digits split must be 'train', 'test' or 'all', got {split!r}")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = bunch.images.astype(np.float32) / 16.0 * 2.0 - 1.0  # 17 grey levels -> [-1, 1]
    labels = bunch.target.astype(np.int64)
    if split == "all":
        idx = np.arange(len(labels))
    else:
        train_idx, test_idx = train_test_split(
            np.arange(len(labels)), test_size=test_fraction, random_state=seed, stratify=labels
        )
        idx = np.sort(train_idx if split == "train" else test_idx)
    return torch.from_numpy(images[idx][:, None]), torch.from_numpy(labels[idx])


# Digit styles for the LoRA-transfer demo's "custom model" (a fine-tune of the digits teacher on restyled digits).
DIGIT_STYLES = ("thick", "invert")


def digits_style(images: torch.Tensor, style: str) -> torch.Tensor:
    """Restyle digits (N x 1 x 8 x 8 in [-1, 1]): "thick" widens every stroke by one pixel (a 2x2 grey-level max
    filter), "invert" draws dark digits on a light ground. Both are plain to see and learnable at 8x8."""
    if style == "thick":
        return torch.nn.functional.max_pool2d(torch.nn.functional.pad(images, (0, 1, 0, 1), value=-1.0), 2, stride=1)
    if style == "invert":
        return -images
    raise ValueError(f"unknown digit style {style!r} (known: {', '.join(DIGIT_STYLES)})")


def digit_prompt_set(n: int, seed: int = 0) -> list[str]:
    """`n` prompts cycling through the ten digits, templates drawn at random (seeded)."""
    rng = np.random.default_rng(seed)
    return [digit_prompt(i % 10, int(rng.integers(len(PROMPT_TEMPLATES)))) for i in range(n)]


def read_text(path: Path) -> str:
    """A text file as users' tools write it: UTF-8 with or without a byte-order mark (spreadsheets, Notepad);
    ValueError naming the file when it is not UTF-8 text."""
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a .txt (one per line), .jsonl or .csv (field `prompt`, `text` or `caption`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        prompts = [line.strip() for line in read_text(path).splitlines() if line.strip()]
    elif suffix == ".jsonl":
        prompts = [_prompt_field(row, path) for row in _jsonl_rows(path)]
    elif suffix == ".csv":
        prompts = [_prompt_field(row, path) for row in csv.DictReader(io.StringIO(read_text(path), newline=""))]
    else:
        raise ValueError(f"{path}: prompt files must be .txt, .jsonl or .csv")
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def prompt_set(source: str, n: int | None, seed: int = 0) -> list[str]:
    """The prompts a stage samples: `source` "digits" -> `digit_prompt_set(n or 100, seed)`, else a prompt file
    (`read_prompts`) cycled to `n` (None: each listed prompt once)."""
    if source == "digits":
        return digit_prompt_set(100 if n is None else n, seed=seed)
    listed = read_prompts(source)
    return [listed[i % len(listed)] for i in range(len(listed) if n is None else n)]


def _jsonl_rows(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(read_text(path).splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object")
            rows.append(row)
    return rows


def _prompt_field(row: dict, path: Path) -> str:
    for key in ("prompt", "text", "caption"):
        if key in row:
            return str(row[key])
    raise ValueError(f"{path}: each row needs a 'prompt', 'text' or 'caption' field, got {sorted(row)}")


# The image files a sample or reference folder may hold (tdm.evaluation.fid reads the same).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def check_sample_set(path: str | Path) -> None:
    """A `tdm score` input, checked before any metric model loads: an npz with arrays `images` (uint8) and
    `prompts` and nothing pickled (tdm never unpickles), or an image folder whose metadata.jsonl (if any)
    parses. Raises FileNotFoundError or ValueError naming the path. Reads array headers only."""
    import zipfile

    path = Path(path)
    if path.is_dir():
        images = [p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
        if len(images) < 2:
            raise ValueError(f"sample folder needs at least 2 images ({', '.join(IMAGE_SUFFIXES)}), found "
                             f"{len(images)}: {path}")
        if (path / "metadata.jsonl").is_file():
            _jsonl_rows(path / "metadata.jsonl")
        return
    if not path.is_file():
        raise FileNotFoundError(f"samples not found (an npz from `tdm sample` or an image folder): {path}")
    what = "not an npz from `tdm sample` (arrays images, prompts)"
    try:
        with zipfile.ZipFile(path) as z:
            names = {n.removesuffix(".npy"): n for n in z.namelist()}
            if "images" not in names or "prompts" not in names:
                raise ValueError(f"{path}: {what}; it holds {sorted(names)}")
            for key in ("images", "prompts"):
                with z.open(names[key]) as f:
                    version = np.lib.format.read_magic(f)
                    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                        np.lib.format.read_array_header_2_0
                    _, _, dtype = read(f)
                if dtype.hasobject:
                    raise ValueError(f"{path}: {key} holds pickled Python objects; refused (tdm never unpickles: "
                                     f"write plain arrays, e.g. `tdm sample`)")
                if key == "images" and dtype != np.uint8:
                    raise ValueError(f"{path}: images must be uint8, got {dtype}")
    except (zipfile.BadZipFile, EOFError, OSError, KeyError) as err:
        raise ValueError(f"{path}: {what} ({err})") from None
    except ValueError as err:
        if str(err).startswith(str(path)):
            raise
        raise ValueError(f"{path}: {what} ({err})") from None


@dataclass
class ImageCaptionFolder:
    """An image-caption folder in the diffusers convention: images + `metadata.jsonl`
    with one `{"file_name": ..., "text": ...}` per line."""

    root: Path
    file_names: list[str]
    captions: list[str]

    @classmethod
    def open(cls, root: str | Path) -> "ImageCaptionFolder":
        root = Path(root)
        meta = root / "metadata.jsonl"
        if not meta.is_file():
            raise FileNotFoundError(f"image-caption folder needs {meta}")
        names, captions = [], []
        for n, row in enumerate(_jsonl_rows(meta), 1):
            if "file_name" not in row or "text" not in row:
                raise ValueError(f"{meta}:{n}: each line needs 'file_name' and 'text'")
            if not (root / row["file_name"]).is_file():
                raise FileNotFoundError(f"{meta}:{n}: image not found: {root / row['file_name']}")
            names.append(row["file_name"])
            captions.append(str(row["text"]))
        if not names:
            raise ValueError(f"{meta}: no rows")
        return cls(root, names, captions)

    def __len__(self) -> int:
        return len(self.file_names)

    def load(self, index: int, resolution: int, channels: int = 3) -> torch.Tensor:
        """Image `index` resized (shorter side) and centre-cropped to `resolution`, in [-1, 1], C x H x W."""
        from PIL import Image

        with Image.open(self.root / self.file_names[index]) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            scale = resolution / min(im.size)
            im = im.resize((max(resolution, round(im.size[0] * scale)), max(resolution, round(im.size[1] * scale))),
                           Image.BICUBIC)
            left, top = (im.size[0] - resolution) // 2, (im.size[1] - resolution) // 2
            im = im.crop((left, top, left + resolution, top + resolution))
            arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
        arr = arr[None] if channels == 1 else arr.transpose(2, 0, 1)
        return torch.from_numpy(np.ascontiguousarray(arr))


# -- video-caption folders ----------------------------------------------------------------------------------------
# The clip files a video-caption folder may hold (decoded with PyAV, FFmpeg's Python binding).
VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv")


def holds_clips(root: str | Path) -> bool:
    """Whether `root`'s metadata.jsonl names video clips (any row's file_name ends in a VIDEO_SUFFIXES suffix);
    False when it has none or no metadata.jsonl (ImageCaptionFolder.open then says what is missing)."""
    meta = Path(root) / "metadata.jsonl"
    if not meta.is_file():
        return False
    return any(Path(str(row.get("file_name", ""))).suffix.lower() in VIDEO_SUFFIXES for row in _jsonl_rows(meta))


def _count_frames(path: Path) -> int:
    """The clip's video frames: the container's count (`stream.frames`, mp4 / mov) once its first frame decodes,
    else (webm / mkv carry none) every frame decoded and counted. ValueError naming the file when it has no video
    stream or does not decode. (`VideoCaptionFolder.load` refuses a clip that turns out shorter than counted.)"""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f"{path}: no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            frames = container.decode(stream)
            n = 1 if next(frames, None) is not None else 0
            if n and stream.frames > 0:
                return int(stream.frames)
            n += sum(1 for _ in frames)
    except av.error.FFmpegError as err:
        raise ValueError(f"{path}: not a decodable video ({err})") from None
    if n == 0:
        raise ValueError(f"{path}: no decodable video frames")
    return n


def uniform_frame_indices(available: int, wanted: int) -> list[int]:
    """`wanted` frame indices spread evenly over the whole clip, first and last frame included (a single frame:
    the middle one). Needs available >= wanted, so no frame repeats (callers refuse shorter clips)."""
    if wanted > available:
        raise ValueError(f"{wanted} frames wanted from a clip of {available}")
    if wanted == 1:
        return [(available - 1) // 2]
    return [round(i * (available - 1) / (wanted - 1)) for i in range(wanted)]


def resize_center_crop(im, height: int, width: int):
    """A PIL image scaled (bicubic) so it covers height x width, then centre-cropped to it."""
    from PIL import Image

    scale = max(height / im.size[1], width / im.size[0])
    size = (max(width, round(im.size[0] * scale)), max(height, round(im.size[1] * scale)))
    im = im.resize(size, Image.BICUBIC)
    left, top = (im.size[0] - width) // 2, (im.size[1] - height) // 2
    return im.crop((left, top, left + width, top + height))


@dataclass
class VideoCaptionFolder:
    """A video-caption folder in the layout of diffusers' / finetrainers' video examples: clips (.mp4, .webm, .mov,
    .mkv) + `metadata.jsonl` with one `{"file_name": ..., "text": ...}` per line. `open` opens every clip and
    counts its frames (`_count_frames`), so a missing, undecodable or empty clip, or a bad row, fails there naming
    the file. `load` samples frames uniformly over the whole clip; a clip shorter than the frames asked for is refused
    (`check_frames`), never looped or padded: repeated frames would teach the model frozen or stuttering motion."""

    root: Path
    file_names: list[str]
    captions: list[str]
    frame_counts: list[int]

    @classmethod
    def open(cls, root: str | Path) -> "VideoCaptionFolder":
        root = Path(root)
        meta = root / "metadata.jsonl"
        if not meta.is_file():
            raise FileNotFoundError(f"video-caption folder needs {meta}")
        names, captions, counts = [], [], []
        for n, row in enumerate(_jsonl_rows(meta), 1):
            if "file_name" not in row or "text" not in row:
                raise ValueError(f"{meta}:{n}: each line needs 'file_name' and 'text'")
            path = root / str(row["file_name"])
            if path.suffix.lower() not in VIDEO_SUFFIXES:
                raise ValueError(f"{meta}:{n}: {path} is not a video clip ({', '.join(VIDEO_SUFFIXES)}); a folder "
                                 f"holds clips or images, not both")
            if not path.is_file():
                raise FileNotFoundError(f"{meta}:{n}: clip not found: {path}")
            names.append(str(row["file_name"]))
            captions.append(str(row["text"]))
            counts.append(_count_frames(path))
        if not names:
            raise ValueError(f"{meta}: no rows")
        return cls(root, names, captions, counts)

    def __len__(self) -> int:
        return len(self.file_names)

    def check_frames(self, num_frames: int) -> None:
        """ValueError naming the first clip with fewer than `num_frames` frames."""
        for name, count in zip(self.file_names, self.frame_counts):
            if count < num_frames:
                raise ValueError(f"{self.root / name}: {count} frames, the model trains on {num_frames} "
                                 f"(clips shorter than that are refused, not looped)")

    def load(self, index: int, num_frames: int, height: int, width: int) -> torch.Tensor:
        """Clip `index`: `num_frames` frames sampled uniformly (`uniform_frame_indices`), each resized to cover
        height x width and centre-cropped, RGB in [-1, 1], F x C x H x W float32."""
        import av

        path = self.root / self.file_names[index]
        if self.frame_counts[index] < num_frames:
            self.check_frames(num_frames)
        wanted = uniform_frame_indices(self.frame_counts[index], num_frames)
        keep, frames = set(wanted), {}
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for i, frame in enumerate(container.decode(stream)):
                if i in keep:
                    im = resize_center_crop(frame.to_image().convert("RGB"), height, width)
                    frames[i] = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
                if i >= wanted[-1]:
                    break
        if len(frames) < len(keep):
            raise ValueError(f"{path}: decoded {max(frames, default=-1) + 1} frames, fewer than the "
                             f"{self.frame_counts[index]} counted when the folder was opened")
        arr = np.stack([frames[i] for i in wanted]).transpose(0, 3, 1, 2)
        return torch.from_numpy(np.ascontiguousarray(arr))
