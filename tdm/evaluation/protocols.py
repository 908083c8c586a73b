"""Published evaluation protocols, their inputs read from where users keep them (nothing downloaded at run time).

`evaluate.protocol` picks one, `evaluate.protocol_path` points at its inputs:

hpsv2     The HPSv2 benchmark (Wu et al. 2023, github.com/tgxs002/HPSv2). `protocol_path` is the benchmark's
          prompt folder as published (HF dataset `zhwang/HPDv2`, `benchmark/`; what `hpsv2.utils.
          download_benchmark_prompts` leaves): `anime.json`, `concept-art.json`, `paintings.json`, `photo.json`,
          each a JSON list of prompt strings (800 each). One HPS score per image (cosine x 100 with the HPS
          checkpoint, `eval.hps_version` v2 / v2.1); per style the mean over that style's images, and the
          "Average" over all images (`hpsv2/evaluation.py: evaluate_benchmark`, which averages 80-prompt chunks
          per style: equal to the plain mean when the style's count is a multiple of 80, as published).
coco2014  Zero-shot text-to-image on MS-COCO 2014 val (the GigaGAN / DMD2 protocol, github.com/mingukkang/GigaGAN
          `evaluation/`). `protocol_path` is `captions_val2014.json` (`images`: [{id, file_name, ...}],
          `annotations`: [{image_id, id, caption}]), `evaluate.coco_images` the `val2014/` image folder. A seeded
          draw (`coco_draw`) of `evaluate.n` distinct images (10k or 30k in papers), one of each image's captions;
          FID (Inception-v3 pool3) of the samples against exactly those images, both centre-cropped to a square
          and resized to `resolution` px with PIL Lanczos (GigaGAN `evaluation.py: compute_fid`,
          `eval_res=256` in its COCO script); CLIP score on the same (resized) samples with `eval.clip_model`.
vbench    VBench's standard prompt suite (Huang et al. 2024, github.com/Vchitect/VBench): `VBench_full_info.json`
          ([{"prompt_en", "dimension": [...]}, ...]), `prompts/all_dimension.txt` (one prompt a line) or a folder
          holding either. The custom_input dimensions score the samples; VBench's quality / semantic / total
          scores (`vbench_scores`, VBench `scripts/constant.py` + `cal_final_score.py`) are given only when every
          dimension they weigh was scored.

`load(cfg)` reads and checks a protocol's files (errors name the key and path) without any model compute.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

PROTOCOLS = ("hpsv2", "coco2014", "vbench")
HPSV2_STYLES = ("anime", "concept-art", "paintings", "photo")
HPSV2_AVERAGE = "average"
HPSV2_CHUNK = 80  # hpsv2/evaluation.py scores each style in chunks of 80 prompts and averages the chunk means
COCO_RESOLUTION = 256  # GigaGAN evaluation/scripts/evaluate_GigaGAN_t2i_coco256.sh: eval_res=256
COCO_METRICS = ("fid", "clip")
HPSV2_METRICS = ("hps",)


@dataclass(frozen=True)
class Protocol:
    """A protocol's prompt set and how its rows are formed.

    `prompts`: one per sample, in sampling order. `groups`: named index sets scored as their own rows (the HPSv2
    styles); empty = one row for the whole set. `resolution`: side (px) that samples (and the reference) are
    centre-cropped and resized to before scoring, None = as sampled. `reference_files`: the reference image per
    sample (coco2014), `image_ids` their COCO ids (`reference_folder` writes them resized). `seed`: the draw's seed (coco2014)."""

    name: str
    version: str
    prompts: tuple[str, ...]
    metrics: tuple[str, ...]
    groups: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    resolution: int | None = None
    reference_files: tuple[Path, ...] = ()
    image_ids: tuple[int, ...] = ()
    seed: int | None = None
    source: str = ""

    @property
    def n(self) -> int:
        return len(self.prompts)


# --- HPSv2 benchmark ----------------------------------------------------------------------------

def read_hpsv2_benchmark(folder: str | Path, per_style: int | None = None, hps_version: str = "v2.1",
                         key: str = "evaluate.protocol_path") -> Protocol:
    """The four style files of the HPSv2 benchmark folder, the first `per_style` prompts of each (None: all,
    the published protocol). Raises FileNotFoundError / ValueError naming `key` and the file."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{key}: the HPSv2 benchmark prompt folder (anime.json, concept-art.json, "
                                f"paintings.json, photo.json) not found: {folder}")
    missing = [f"{s}.json" for s in HPSV2_STYLES if not (folder / f"{s}.json").is_file()]
    if missing:
        raise FileNotFoundError(f"{key}: {folder} lacks {', '.join(missing)} (the HPSv2 benchmark's prompt files, "
                                f"HF dataset zhwang/HPDv2 benchmark/)")
    prompts: list[str] = []
    groups: dict[str, tuple[int, ...]] = {}
    for style in HPSV2_STYLES:
        path = folder / f"{style}.json"
        try:
            listed = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{key}: {path}: not a JSON list of prompts ({err})") from None
        if not isinstance(listed, list) or not listed or not all(isinstance(p, str) and p.strip() for p in listed):
            raise ValueError(f"{key}: {path}: expected a non-empty JSON list of prompt strings")
        listed = listed[:per_style] if per_style is not None else listed
        groups[style] = tuple(range(len(prompts), len(prompts) + len(listed)))
        prompts += listed
    return Protocol("hpsv2", hps_version, tuple(prompts), HPSV2_METRICS, groups=groups, source=str(folder))


def hpsv2_group_score(scores: np.ndarray) -> float:
    """A style's HPSv2 benchmark score from its per-image scores: the mean of the 80-prompt chunk means
    (`hpsv2/evaluation.py`), i.e. the plain mean when the count is a multiple of 80."""
    scores = np.asarray(scores, dtype=np.float64)
    return float(np.mean([scores[i:i + HPSV2_CHUNK].mean() for i in range(0, len(scores), HPSV2_CHUNK)]))


# --- COCO 2014 val captions ---------------------------------------------------------------------

def read_coco_captions(path: str | Path, key: str = "evaluate.protocol_path") -> tuple[dict[int, str], dict[int, list[str]]]:
    """({image id: file_name}, {image id: [captions in annotation-id order]}) from `captions_val2014.json`;
    only images with at least one caption. Raises FileNotFoundError / ValueError naming `key`."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{key}: captions file (captions_val2014.json) not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        files = {int(im["id"]): str(im["file_name"]) for im in data["images"]}
        anns = sorted(data["annotations"], key=lambda a: int(a["id"]))
        captions: dict[int, list[str]] = {}
        for a in anns:
            image_id = int(a["image_id"])
            if image_id not in files:
                raise ValueError(f"annotation {a['id']} names image_id {image_id}, which is not in `images`")
            captions.setdefault(image_id, []).append(str(a["caption"]).strip())
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{key}: {path}: not in the captions_val2014.json layout ({{'images': [{{id, "
                         f"file_name}}], 'annotations': [{{image_id, id, caption}}]}}): {err!r}") from None
    if not captions:
        raise ValueError(f"{key}: {path}: no captions")
    return {i: files[i] for i in captions}, captions


def coco_draw(captions: Mapping[int, Sequence[str]], n: int, seed: int) -> list[tuple[int, str]]:
    """The seeded draw: `n` distinct image ids (without replacement, from the ids in ascending order) and one
    caption of each (uniform among its captions), as [(image id, caption)]. numpy's PCG64 (`default_rng(seed)`)
    makes it the same on every machine. ValueError when fewer than `n` images have captions."""
    ids = sorted(captions)
    if n > len(ids):
        raise ValueError(f"evaluate.n: {n} captions asked for, but only {len(ids)} images have captions")
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(ids), size=n, replace=False)
    picks = rng.integers(0, 1 << 30, size=n)
    return [(ids[i], captions[ids[i]][int(p) % len(captions[ids[i]])]) for i, p in zip(chosen, picks)]


def read_coco2014(captions_path: str | Path, images: str | Path | None, n: int, seed: int,
                  resolution: int = COCO_RESOLUTION) -> Protocol:
    """The coco2014 protocol: `n` seeded captions, each with its reference image in `images` (checked to exist
    now: a missing one fails naming `evaluate.coco_images` and the file)."""
    files, captions = read_coco_captions(captions_path)
    if images is None:
        raise ValueError("evaluate.coco_images: required for protocol coco2014 (the val2014 image folder)")
    folder = Path(images).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"evaluate.coco_images: not a folder: {folder}")
    draw = coco_draw(captions, n, seed)
    refs = []
    for image_id, _ in draw:
        f = folder / files[image_id]
        if not f.is_file():
            raise FileNotFoundError(f"evaluate.coco_images: image {image_id} ({files[image_id]}) not found in {folder}")
        refs.append(f)
    return Protocol("coco2014", "val2014", tuple(c for _, c in draw), COCO_METRICS, resolution=resolution,
                    reference_files=tuple(refs), image_ids=tuple(i for i, _ in draw), seed=seed,
                    source=str(Path(captions_path).expanduser()))


def center_crop_resize(image, size: int) -> np.ndarray:
    """uint8 H x W x C (or a PIL image) -> uint8 size x size x 3: the centre square of side min(H, W), resized
    with PIL Lanczos (GigaGAN `CenterCropLongEdge` + `Image.resize(..., LANCZOS)`)."""
    from PIL import Image

    im = image if isinstance(image, Image.Image) else Image.fromarray(
        np.repeat(image, 3, axis=-1) if np.asarray(image).shape[-1] == 1 else np.asarray(image))
    im = im.convert("RGB")
    w, h = im.size
    side = min(w, h)
    left, top = int(round((w - side) / 2.0)), int(round((h - side) / 2.0))  # torchvision center_crop's rounding
    im = im.crop((left, top, left + side, top + side))
    if side != size:
        im = im.resize((size, size), Image.LANCZOS)
    return np.asarray(im)


def resize_set(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 N x H x W x C -> uint8 N x size x size x 3 (`center_crop_resize` each)."""
    return np.stack([center_crop_resize(im, size) for im in np.asarray(images)])


def reference_folder(protocol: Protocol, cache_root: str | Path) -> Path:
    """The drawn reference images, `center_crop_resize`d to the resolution, as PNGs (`00000_<image id>.png`, draw
    order) in a folder under `cache_root` named by what determines them (captions file, draw, resolution), built
    once, atomically, streaming one image at a time (30k x 256 px is ~4 GB in memory): the FID reference, whose
    Inception statistics `tdm.evaluation.fid` then caches too."""
    import hashlib

    from PIL import Image

    from tdm.artifacts import atomic_folder

    h = hashlib.sha256()
    src = Path(protocol.source)
    stat = src.stat()
    h.update(f"{src.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{protocol.resolution}\n".encode())
    for image_id, f in zip(protocol.image_ids, protocol.reference_files):
        h.update(f"{image_id}:{f.name}:{f.stat().st_size}\n".encode())
    folder = Path(cache_root) / f"{protocol.name}-{protocol.resolution}px-n{protocol.n}-{h.hexdigest()[:16]}"
    if (folder / "DONE").is_file():
        return folder
    with atomic_folder(folder) as tmp:
        for i, (image_id, f) in enumerate(zip(protocol.image_ids, protocol.reference_files)):
            with Image.open(f) as im:
                Image.fromarray(center_crop_resize(im, protocol.resolution)).save(tmp / f"{i:05d}_{image_id}.png")
        (tmp / "DONE").write_text(json.dumps({"source": str(src), "image_ids": list(protocol.image_ids),
                                              "resolution": protocol.resolution, "seed": protocol.seed}))
    return folder


# --- VBench standard prompt suite ---------------------------------------------------------------

# VBench scripts/constant.py: per-dimension weights, normalisation ranges and the quality / semantic split.
VBENCH_QUALITY = ("subject_consistency", "background_consistency", "temporal_flickering", "motion_smoothness",
                  "aesthetic_quality", "imaging_quality", "dynamic_degree")
VBENCH_SEMANTIC = ("object_class", "multiple_objects", "human_action", "color", "spatial_relationship", "scene",
                   "appearance_style", "temporal_style", "overall_consistency")
VBENCH_WEIGHT = {d: 1.0 for d in VBENCH_QUALITY + VBENCH_SEMANTIC} | {"dynamic_degree": 0.5}
VBENCH_RANGE = {"subject_consistency": (0.1462, 1.0), "background_consistency": (0.2615, 1.0),
                "temporal_flickering": (0.6293, 1.0), "motion_smoothness": (0.706, 0.9975),
                "scene": (0.0, 0.8222), "appearance_style": (0.0009, 0.2855), "temporal_style": (0.0, 0.364),
                "overall_consistency": (0.0, 0.364)}
VBENCH_QUALITY_WEIGHT, VBENCH_SEMANTIC_WEIGHT = 4.0, 1.0


def read_vbench_suite(path: str | Path, n: int | None = None, key: str = "evaluate.protocol_path") -> Protocol:
    """VBench's standard prompts (the first `n`; None: all) from `VBench_full_info.json`, `all_dimension.txt` or a
    folder holding either (`prompts/` inside it searched too)."""
    path = Path(path).expanduser()
    if path.is_dir():
        found = [p for p in (path / "VBench_full_info.json", path / "all_dimension.txt",
                             path / "prompts" / "all_dimension.txt") if p.is_file()]
        if not found:
            raise FileNotFoundError(f"{key}: {path} holds neither VBench_full_info.json nor all_dimension.txt")
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"{key}: VBench prompt suite not found: {path}")
    try:
        if path.suffix == ".json":
            prompts = [str(e["prompt_en"]) for e in json.loads(path.read_text(encoding="utf-8"))]
        else:
            prompts = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{key}: {path}: not a VBench prompt suite ({err!r})") from None
    if not prompts:
        raise ValueError(f"{key}: {path}: no prompts")
    from tdm.evaluation import VIDEO_METRICS

    return Protocol("vbench", path.name, tuple(prompts[:n] if n is not None else prompts), VIDEO_METRICS,
                    source=str(path))


def vbench_scores(dimensions: Mapping[str, float]) -> dict[str, float | None]:
    """VBench's quality / semantic / total scores from raw dimension scores (keys as VBench names them),
    `cal_final_score.py`: each dimension min-max normalised, weighted means per group, total = (4 quality +
    1 semantic) / 5. A score whose dimensions are not all present is None."""
    def norm(d: str) -> float:
        lo, hi = VBENCH_RANGE.get(d, (0.0, 1.0))
        return (float(dimensions[d]) - lo) / (hi - lo)

    def group(dims: Sequence[str]) -> float | None:
        if not all(d in dimensions and math.isfinite(dimensions[d]) for d in dims):
            return None
        return sum(norm(d) * VBENCH_WEIGHT[d] for d in dims) / sum(VBENCH_WEIGHT[d] for d in dims)

    quality, semantic = group(VBENCH_QUALITY), group(VBENCH_SEMANTIC)
    total = None if quality is None or semantic is None else (
        (quality * VBENCH_QUALITY_WEIGHT + semantic * VBENCH_SEMANTIC_WEIGHT)
        / (VBENCH_QUALITY_WEIGHT + VBENCH_SEMANTIC_WEIGHT))
    return {"vbench_quality": quality, "vbench_semantic": semantic, "vbench_total": total}


# --- from the config ----------------------------------------------------------------------------

def load(cfg) -> Protocol | None:
    """The configured protocol (None when `evaluate.protocol` is null), its files read and checked."""
    e = cfg.evaluate
    if e.protocol is None:
        return None
    if e.protocol == "hpsv2":
        return read_hpsv2_benchmark(e.protocol_path, per_style=e.n, hps_version=cfg.eval.hps_version)
    if e.protocol == "coco2014":
        resolution = e.protocol_resolution or COCO_RESOLUTION
        return read_coco2014(e.protocol_path, e.coco_images, e.n, cfg.sample.seed, resolution=resolution)
    if e.protocol == "vbench":
        return read_vbench_suite(e.protocol_path, n=e.n)
    raise ValueError(f"evaluate.protocol: unknown {e.protocol!r} (known: {', '.join(PROTOCOLS)})")
