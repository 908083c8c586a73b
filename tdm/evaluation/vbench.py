"""VBench, driven as a subprocess in its own virtual environment (scripts/vbench_env.sh builds .venv-vbench).

VBench 0.1.5 pins transformers 4.33 and numpy<2, so it cannot share the project's environment. `run_vbench`
writes the job (videos as a uint8 N x T x H x W x C array, or a folder of .mp4), runs `_vbench_driver.py`
with the VBench interpreter in `custom_input` mode, and parses VBench's results file back:
{dimension: score}. Weights are read from `<weights_dir>/vbench` (VBENCH_CACHE_DIR); a dimension whose files
are missing raises MissingWeights before the subprocess starts (VBench itself would try `wget`).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tdm.evaluation.weights import MissingWeights, weights_env

# Dimensions VBench scores in custom_input mode, and the files each needs under VBENCH_CACHE_DIR.
DIMENSION_FILES: dict[str, tuple[tuple[str, str], ...]] = {
    "temporal_flickering": (),
    "subject_consistency": (("dino_model/dino_vitbase16_pretrain.pth",
                             "https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth"),
                            ("dino_model/facebookresearch_dino_main/hubconf.py",
                             "a clone of https://github.com/facebookresearch/dino")),
    "background_consistency": (("clip_model/ViT-B-32.pt", "OpenAI CLIP ViT-B/32 (openaipublic.azureedge.net)"),),
    "aesthetic_quality": (("clip_model/ViT-L-14.pt", "OpenAI CLIP ViT-L/14 (openaipublic.azureedge.net)"),
                          ("aesthetic_model/emb_reader/sa_0_4_vit_l_14_linear.pth",
                           "https://github.com/LAION-AI/aesthetic-predictor")),
    "imaging_quality": (("pyiqa_model/musiq_spaq_ckpt-358bb6af.pth",
                         "https://github.com/chaofengc/IQA-PyTorch/releases/download/v0.1-weights/"),),
    "motion_smoothness": (("amt_model/amt-s.pth", "https://huggingface.co/lalala125/AMT"),),
    "dynamic_degree": (("raft_model/models/raft-things.pth", "RAFT models.zip (VBench's README)"),),
    "human_action": (("umt_model/l16_ptk710_ftk710_ftk400_f16_res224.pth",
                      "https://huggingface.co/OpenGVLab/VBench_Used_Models"),),
    "temporal_style": (("ViCLIP/ViClip-InternVid-10M-FLT.pth", "https://huggingface.co/OpenGVLab/VBench_Used_Models"),),
    "overall_consistency": (("ViCLIP/ViClip-InternVid-10M-FLT.pth",
                             "https://huggingface.co/OpenGVLab/VBench_Used_Models"),),
}
DRIVER = Path(__file__).with_name("_vbench_driver.py")


class VBenchUnavailable(MissingWeights):
    """The VBench virtual environment is not built (skipped like missing weights under skip_missing)."""


def vbench_python(venv: str | Path) -> Path:
    python = (Path(venv) / "bin" / "python").absolute()  # not resolve(): that would leave the venv
    if not python.is_file():
        raise VBenchUnavailable(f"VBench environment not found: {venv} (build it with scripts/vbench_env.sh)")
    return python


def check_dimensions(dimensions: Sequence[str], weights_dir: str | Path) -> None:
    """Unknown dimensions and missing weight files fail here, in milliseconds."""
    unknown = [d for d in dimensions if d not in DIMENSION_FILES]
    if unknown or not dimensions:
        raise ValueError(f"VBench dimension(s) {unknown or '(none)'} not available in custom_input mode "
                         f"(available: {', '.join(DIMENSION_FILES)})")
    cache = Path(weights_env(weights_dir)["VBENCH_CACHE_DIR"])
    for dim in dimensions:
        for rel, source in DIMENSION_FILES[dim]:
            if not (cache / rel).is_file():
                raise MissingWeights(f"vbench {dim}: weights not found: {cache / rel}; get it from {source} and "
                                     "place it there; see docs/evaluation.md")


def _check_videos(videos: np.ndarray) -> np.ndarray:
    videos = np.asarray(videos)
    if videos.dtype != np.uint8 or videos.ndim != 5 or videos.shape[-1] not in (1, 3) or videos.shape[1] < 2:
        raise ValueError(f"videos must be uint8 N x T x H x W x 1|3 with T >= 2, got {videos.dtype} {videos.shape}")
    return videos


def run_vbench(dimensions: Sequence[str], weights_dir: str | Path, venv: str | Path, *,
               videos: np.ndarray | None = None, video_folder: str | Path | None = None,
               prompts: Sequence[str] = (), fps: int = 8, device: str = "cpu",
               work_dir: str | Path | None = None, timeout: float = 3600) -> dict:
    """{"scores": {dimension: mean score}, "per_video": {dimension: [score, ...]}} from VBench's own code."""
    if (videos is None) == (video_folder is None):
        raise ValueError("give exactly one of videos (an array) or video_folder")
    python = vbench_python(venv)
    check_dimensions(dimensions, weights_dir)
    if video_folder is not None and not Path(video_folder).is_dir():
        raise FileNotFoundError(f"video folder not found: {video_folder}")
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        tmp = Path(tmp)
        job = {"videos": None if video_folder is None else str(Path(video_folder).resolve()), "frames": None,
               "prompts": list(prompts), "dimensions": list(dimensions), "out": str(tmp / "out"), "fps": fps,
               "device": device}
        if videos is not None:
            videos = _check_videos(videos)
            if prompts and len(prompts) != len(videos):
                raise ValueError(f"{len(videos)} videos but {len(prompts)} prompts")
            np.savez(tmp / "videos.npz", videos=videos)
            job["frames"] = str(tmp / "videos.npz")
        (tmp / "job.json").write_text(json.dumps(job))
        env = {**os.environ, **weights_env(weights_dir)}
        env.pop("PYTHONPATH", None)  # the project's packages must not shadow VBench's pins
        proc = subprocess.run([str(python), str(DRIVER), str(tmp / "job.json")], env=env, cwd=tmp,
                              capture_output=True, text=True, timeout=timeout, check=False)
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            raise RuntimeError(f"VBench failed (exit {proc.returncode}):\n{tail}")
        results = json.loads(Path(proc.stdout.strip().splitlines()[-1]).read_text())
    return {"scores": {dim: float(results[dim][0]) for dim in dimensions},
            "per_video": {dim: [float(v["video_results"]) for v in results[dim][1]] for dim in dimensions}}


if __name__ == "__main__":  # `python -m tdm.evaluation.vbench VIDEO_FOLDER DIM...` for a quick check
    print(json.dumps(run_vbench(sys.argv[2:], os.environ.get("TDM_WEIGHTS_DIR", "outputs/weights"),
                                os.environ.get("TDM_VBENCH_VENV", ".venv-vbench"), video_folder=sys.argv[1])))
