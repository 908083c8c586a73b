"""Runs inside VBench's own virtual environment (.venv-vbench): imports nothing from tdm.

usage: python _vbench_driver.py JOB.json
JOB: {"videos": folder of .mp4 | null, "frames": npz with `videos` (uint8 N x T x H x W x C) | null,
      "prompts": [...], "dimensions": [...], "out": folder, "fps": int, "device": "cpu"|"cuda"}
Writes <out>/tdm_eval_results.json (VBench's own results file) and prints its path last.
"""
import json
import os
import sys

# This file sits beside tdm/evaluation/vbench.py, which must not shadow the real `vbench` package.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]


def write_videos(npz_path, folder, fps):
    import cv2
    import numpy as np

    os.makedirs(folder, exist_ok=True)
    with np.load(npz_path) as z:
        videos = z["videos"]
    paths = []
    for i, video in enumerate(videos):
        path = os.path.join(folder, f"video_{i:05d}.mp4")
        h, w = video.shape[1:3]
        writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
        for frame in video:
            rgb = np.repeat(frame, 3, axis=-1) if frame.shape[-1] == 1 else frame
            writer.write(cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR))
        writer.release()
        paths.append(path)
    return paths


def main():
    with open(sys.argv[1]) as f:
        job = json.load(f)
    if job.get("frames"):
        folder = os.path.join(job["out"], "videos")
        paths = write_videos(job["frames"], folder, job.get("fps", 8))
    else:
        folder = job["videos"]
        paths = sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.lower().endswith(".mp4"))
    prompts = {os.path.basename(p): text for p, text in zip(paths, job["prompts"])}

    import vbench
    from vbench import VBench

    info = os.path.join(os.path.dirname(vbench.__file__), "VBench_full_info.json")
    bench = VBench(job.get("device", "cpu"), info, job["out"])
    bench.evaluate(videos_path=folder, name="tdm", prompt_list=prompts, dimension_list=job["dimensions"],
                   local=True, mode="custom_input")
    print(os.path.join(job["out"], "tdm_eval_results.json"))


if __name__ == "__main__":
    main()
