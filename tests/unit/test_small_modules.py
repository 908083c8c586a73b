"""EMA, artifacts (atomic files/folders, sample archives), the metrics log, training helpers."""
import json
import os

import numpy as np
import pytest
import torch

from tdm.artifacts import atomic_folder, image_grid, load_samples, save_samples, write_json
from tdm.ema import EMA
from tdm.tracking import MetricsLog
from tdm.training import lr_factor, step_generator


def test_ema_follows_the_warmup_decay_and_round_trips():
    p = {"w": torch.zeros(3)}
    ema = EMA(p, decay=0.9)
    p["w"] = torch.ones(3)
    ema.update(p)  # n=1: decay min(0.9, 2/11)
    assert torch.allclose(ema.shadow["w"], torch.full((3,), 1 - 2 / 11))
    for _ in range(100):
        ema.update(p)
    assert torch.allclose(ema.shadow["w"], torch.ones(3), atol=1e-4)
    other = EMA({"w": torch.zeros(3)}, decay=0.9)
    other.load_state_dict(ema.state_dict())
    assert torch.equal(other.shadow["w"], ema.shadow["w"]) and other.num_updates == 101
    net = torch.nn.Linear(3, 1, bias=False)
    copy = EMA({"weight": torch.full((1, 3), 2.0)}, 0.9).averaged_copy(net)
    assert torch.equal(copy.weight, torch.full((1, 3), 2.0)) and not copy.weight.requires_grad
    with pytest.raises(ValueError):
        other.load_state_dict({"shadow": {"v": torch.zeros(1)}, "num_updates": 0})


def test_samples_archive_and_grid(tmp_path):
    images = np.arange(5 * 8 * 8, dtype=np.uint8).reshape(5, 8, 8, 1)
    npz, png = save_samples(tmp_path / "s.npz", images, [f"p{i}" for i in range(5)], steps=4)
    back, prompts = load_samples(npz)
    assert np.array_equal(back, images) and prompts == ["p0", "p1", "p2", "p3", "p4"]
    from PIL import Image

    assert Image.open(png).size == image_grid(images, scale=8).shape[1::-1]
    grid = image_grid(images, ncol=5, pad=1)
    assert grid.shape == (10, 46, 1) and np.array_equal(grid[1:9, 1:9], images[0])
    with pytest.raises(ValueError, match="uint8"):
        save_samples(tmp_path / "x.npz", images.astype(np.float32), ["a"] * 5)
    with pytest.raises(ValueError, match="prompts"):
        save_samples(tmp_path / "x.npz", images, ["a"])


def test_video_samples_archive_and_contact_sheet(tmp_path):
    rng = np.random.default_rng(0)
    videos = rng.integers(0, 256, (3, 13, 16, 24, 3), dtype=np.uint8)  # N, F, H, W, C
    npz, png = save_samples(tmp_path / "v.npz", videos, ["a", "b", "c"])
    back, _ = load_samples(npz)
    assert np.array_equal(back, videos)
    from PIL import Image

    sheet = np.asarray(Image.open(png))
    # 3 rows (samples) x 8 evenly spaced frames (0, 2, 3, 5, 7, 9, 10, 12), each upscaled 4x (64 // 16)
    assert sheet.shape == (3 * (64 + 1) + 1, 8 * (96 + 1) + 1, 3)
    assert np.array_equal(sheet[1 + 65:1 + 65 + 64:4, 1 + 97 * 7:1 + 97 * 7 + 96:4], videos[1, 12])


def test_write_json_is_strict_and_atomic(tmp_path):
    write_json(tmp_path / "m.json", {"a": 1.5})
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": 1.5}
    with pytest.raises(ValueError):
        write_json(tmp_path / "m.json", {"a": float("nan")})
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": 1.5}  # the old file survives
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]
    assert oct((tmp_path / "m.json").stat().st_mode & 0o777) != oct(0o600)  # not mkstemp's private mode


def test_atomic_folder_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "model"
    with atomic_folder(target) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_folder(target) as tmp:
            (tmp / "a").write_text("2")
            raise RuntimeError("crash mid-write")
    assert (target / "a").read_text() == "1"
    with atomic_folder(target) as tmp:
        (tmp / "b").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    assert os.stat(target).st_mode & 0o055  # readable by others, unlike mkdtemp's 0700


def test_metrics_log_writes_rows_and_truncates_on_resume(tmp_path):
    log = MetricsLog(tmp_path / "m.jsonl")
    log.write([{"step": s, "loss": s * 0.5, "lr": 1e-3} for s in range(1, 6)])
    resumed = MetricsLog(tmp_path / "m.jsonl", resume_from_step=3)
    resumed.write([{"step": 4, "loss": 9.0, "grad_norm": float("inf")}])
    lines = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4] and lines[1]["loss"] == 1.0 and lines[-1]["loss"] == 9.0
    assert lines[-1]["grad_norm"] == "inf"  # strict JSON: non-finite values as strings
    assert MetricsLog(tmp_path / "m.jsonl").path.read_text() == ""  # a fresh run starts an empty log


def test_step_generators_are_independent_and_reproducible():
    a = torch.rand(3, generator=step_generator(0, 5))
    assert torch.equal(a, torch.rand(3, generator=step_generator(0, 5)))
    assert not torch.equal(a, torch.rand(3, generator=step_generator(0, 6)))
    assert not torch.equal(a, torch.rand(3, generator=step_generator(0, 5, process=1)))
    assert lr_factor(5, 0, 10, "constant") == 1.0


def test_tdm_sample_writes_a_video_model_as_frames(tmp_path, monkeypatch):
    import tiny_models
    from tdm.cli import main

    folder = tiny_models.save_pipeline(tiny_models.build("cogvideox"), tmp_path / "cog")
    monkeypatch.chdir(tmp_path)
    assert main(["sample", "-q", "--model", str(folder), "--steps", "2", "--guidance", "2", "--prompt",
                 "a cat surfing", "--n", "2", "--out", "v.npz"]) == 0
    videos, prompts = load_samples(tmp_path / "v.npz")
    assert videos.ndim == 5 and videos.shape[0] == 2 and videos.shape[-1] == 3 and prompts == ["a cat surfing"] * 2
    assert videos.std() > 0 and (tmp_path / "v.png").is_file()
