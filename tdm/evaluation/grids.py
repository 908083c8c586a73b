"""Sample grids meant to be looked at: cells upscaled (nearest) to a readable size, separated by a gutter, each
with its prompt as a caption underneath (PIL). Videos: each cell is a strip of evenly spaced frames.

`captioned_grid(images, prompts)` -> PIL image; `save_grid(path, images, prompts)` writes it as PNG atomically.
The evaluate stage writes one beside each sample archive (`samples_<model>_s<steps>.png`).
"""
from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np

CELL = 192  # target cell side (px): small samples are upscaled by an integer factor to about this
MAX_CELLS = 16
GUTTER = 8
STRIP_FRAMES = 4
BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow's bundled scalable font (needs FreeType)
    except (TypeError, OSError, AttributeError):
        return ImageFont.load_default()


def _rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image


def _fit(image: np.ndarray, cell: int):
    """One uint8 H x W x C image -> a PIL RGB image whose longer side is about `cell`: upscaled by an integer
    factor with nearest neighbour (pixels stay sharp), larger ones downscaled with Lanczos."""
    from PIL import Image

    im = Image.fromarray(_rgb(image))
    side = max(im.size)
    if side < cell:
        k = max(1, cell // side)
        return im.resize((im.size[0] * k, im.size[1] * k), Image.NEAREST) if k > 1 else im
    if side > cell:
        scale = cell / side
        return im.resize((max(1, round(im.size[0] * scale)), max(1, round(im.size[1] * scale))), Image.LANCZOS)
    return im


def _cell_image(sample: np.ndarray, cell: int):
    """An image, or a video (T x H x W x C) as a strip of up to STRIP_FRAMES evenly spaced frames."""
    from PIL import Image

    sample = np.asarray(sample)
    if sample.ndim == 3:
        return _fit(sample, cell)
    frames = np.linspace(0, len(sample) - 1, min(STRIP_FRAMES, len(sample))).round().astype(int)
    tiles = [_fit(sample[i], cell // 2 if len(frames) > 2 else cell) for i in frames]
    strip = Image.new("RGB", (sum(t.size[0] for t in tiles) + 2 * (len(tiles) - 1), tiles[0].size[1]), BACKGROUND)
    x = 0
    for t in tiles:
        strip.paste(t, (x, 0))
        x += t.size[0] + 2
    return strip


def _wrap(draw, text: str, font, width: int, lines: int) -> list[str]:
    """`text` wrapped to `width` px, at most `lines` lines (the last ends with an ellipsis when cut)."""
    words, out, line = text.split(), [], ""
    for word in words:
        trial = f"{line} {word}".strip()
        if draw.textlength(trial, font=font) <= width or not line:
            line = trial
        else:
            out.append(line)
            line = word
    if line:
        out.append(line)
    if len(out) > lines:
        out = out[:lines]
        last = out[-1]
        while last and draw.textlength(last + "…", font=font) > width:
            last = last[:-1]
        out[-1] = last.rstrip() + "…"
    # A single word wider than the cell: cut by characters.
    return [s if draw.textlength(s, font=font) <= width else textwrap.shorten(s, max(4, width // 7), placeholder="…")
            for s in out]


def captioned_grid(images: np.ndarray, prompts: Sequence[str], ncol: int | None = None, cell: int = CELL,
                   gutter: int = GUTTER, caption_lines: int = 3, max_cells: int = MAX_CELLS, font_size: int = 12):
    """The first `max_cells` samples (uint8 N x H x W x C images or N x T x H x W x C videos) as a PIL RGB grid
    of `ncol` columns (default: square-ish; videos 2), `gutter` px of background between and around cells, each
    prompt wrapped under its cell in at most `caption_lines` lines. Raises ValueError on other shapes/dtypes."""
    from PIL import Image, ImageDraw

    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim not in (4, 5) or images.shape[-1] not in (1, 3) or not len(images):
        raise ValueError(f"expected uint8 N x H x W x 1|3 images or N x T x H x W x 1|3 videos, got "
                         f"{images.dtype} {images.shape}")
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts for {len(images)} samples")
    n = min(len(images), max_cells)
    cells = [_cell_image(images[i], cell) for i in range(n)]
    ncol = ncol or (min(2, n) if images.ndim == 5 else math.ceil(math.sqrt(n)))
    nrow = math.ceil(n / ncol)
    font = _font(font_size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    cw, ch = max(c.size[0] for c in cells), max(c.size[1] for c in cells)
    captions = [_wrap(probe, str(prompts[i]), font, cw, caption_lines) for i in range(n)]
    line_h = int(font_size * 1.25) + 1
    cap_h = line_h * max((len(c) for c in captions), default=0) + (4 if any(captions) else 0)
    grid = Image.new("RGB", (gutter + ncol * (cw + gutter), gutter + nrow * (ch + cap_h + gutter)), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    for i, (im, lines) in enumerate(zip(cells, captions)):
        r, c = divmod(i, ncol)
        x, y = gutter + c * (cw + gutter), gutter + r * (ch + cap_h + gutter)
        grid.paste(im, (x + (cw - im.size[0]) // 2, y + (ch - im.size[1]) // 2))
        for j, line in enumerate(lines):
            draw.text((x, y + ch + 3 + j * line_h), line, fill=TEXT, font=font)
    return grid


def save_grid(path: str | Path, images: np.ndarray, prompts: Sequence[str], **kw) -> Path:
    """`captioned_grid` written to `path` (PNG), atomically."""
    from tdm.artifacts import atomic_write_file

    grid = captioned_grid(images, prompts, **kw)
    return atomic_write_file(path, lambda p: grid.save(p, format="PNG"))
