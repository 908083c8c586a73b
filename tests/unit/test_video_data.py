"""Video-caption folders (issue #14): clips + metadata.jsonl decoded with PyAV, frames sampled uniformly over the
clip, resized + centre-cropped to the model's native shape; bad inputs refused by file name before any model
loads (a clip shorter than the model's frames: refused once the model's frame count is known, before step 1);
one teacher-ft step on tiny CogVideoX (9 frames) and tiny Wan (5 frames) from a clip folder.

The clips are written here with PyAV: 12 frames of 24x32, a white square moving right over a background whose
grey level encodes the frame index (16 + 18 i), so the frames the loader picks can be read back."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import tiny_models
from tdm import config
from tdm.config import StagePaths
from tdm.data import VideoCaptionFolder, holds_clips, uniform_frame_indices

PROMPTS = ["a square moving right", "a white box on grey", "a small block sliding"]
FRAMES, H, W = 12, 24, 32


def _level(i: int) -> int:
    return 16 + 18 * i


def write_clip(path, frames: int = FRAMES, codec: str = "libx264", options=None):
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=8)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.options = options if options is not None else ({"crf": "0"} if codec == "libx264" else {})
        for i in range(frames):
            img = np.full((H, W, 3), _level(i), dtype=np.uint8)
            x = 2 * i
            img[8:16, x:x + 8] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def _folder(root, names=("0.mp4", "1.webm", "2.mkv"), frames=FRAMES):
    root.mkdir(parents=True, exist_ok=True)
    codecs = {".mp4": "libx264", ".webm": "libvpx", ".mkv": "ffv1", ".mov": "mpeg4"}
    rows = []
    for name, text in zip(names, PROMPTS):
        write_clip(root / name, frames, codecs[name[name.rindex("."):]],
                   {"crf": "4", "b:v": "1M"} if name.endswith(".webm") else None)
        rows.append(json.dumps({"file_name": name, "text": text}))
    (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    return _folder(tmp_path_factory.mktemp("clips"))


def test_loader_samples_frames_uniformly_and_crops(clips):
    data = VideoCaptionFolder.open(clips)
    assert len(data) == 3 and data.captions == PROMPTS and data.frame_counts == [FRAMES] * 3
    assert holds_clips(clips)
    want = uniform_frame_indices(FRAMES, 9)
    assert want == [0, 1, 3, 4, 6, 7, 8, 10, 11]
    for i in range(3):
        video = data.load(i, 9, 16, 16)
        assert video.shape == (9, 3, 16, 16) and video.dtype == torch.float32
        assert video.min() >= -1 and video.max() <= 1
        # background grey (a corner of the crop, away from the square) identifies each frame picked
        grey = ((video[:, :, -2:, -2:].mean((1, 2, 3)) + 1) * 127.5).numpy()
        np.testing.assert_allclose(grey, [_level(k) for k in want], atol=8)
    # a non-square target: scaled to cover, centre-cropped
    assert data.load(0, 5, 8, 16).shape == (5, 3, 8, 16)
    assert uniform_frame_indices(FRAMES, 1) == [5] and uniform_frame_indices(5, 5) == [0, 1, 2, 3, 4]


def test_bad_inputs_are_refused_by_name(clips, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.mp4").write_bytes(b"not a video at all" * 10)
    (bad / "metadata.jsonl").write_text(json.dumps({"file_name": "broken.mp4", "text": "x"}))
    with pytest.raises(ValueError, match=r"broken\.mp4"):
        VideoCaptionFolder.open(bad)
    (bad / "metadata.jsonl").write_text(json.dumps({"file_name": "gone.mp4", "text": "x"}))
    with pytest.raises(FileNotFoundError, match=r"gone\.mp4"):
        VideoCaptionFolder.open(bad)
    (bad / "metadata.jsonl").write_text(json.dumps({"file_name": "0.mp4"}))
    with pytest.raises(ValueError, match=r"metadata\.jsonl:1: each line needs 'file_name' and 'text'"):
        VideoCaptionFolder.open(bad)
    (bad / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "x"}) + "\n"
                                        + json.dumps({"file_name": "b.mp4", "text": "y"}))
    with pytest.raises(ValueError, match=r"a\.png is not a video clip"):
        VideoCaptionFolder.open(bad)
    short = VideoCaptionFolder.open(_folder(tmp_path / "short", names=("s.mp4",), frames=4))
    with pytest.raises(ValueError, match=r"s\.mp4: 4 frames, the model trains on 5"):
        short.check_frames(5)
    with pytest.raises(ValueError, match=r"s\.mp4"):
        short.load(0, 5, 16, 16)
    # through the stage's input check (no model needed: the digits family refuses clips outright)
    from tdm import teacher_ft

    cfg = config.parse(config.apply_overrides({}, [f"teacher_ft.data={clips}"]))
    with pytest.raises(ValueError, match=r"teacher_ft\.data: .*holds video clips; they train video families"):
        teacher_ft.check_inputs(cfg)


@pytest.mark.parametrize("name,family,frames", [("cogvideox", "cogvideox", 9), ("wan", "wan", 5)])
def test_teacher_ft_step_on_a_clip_folder(name, family, frames, clips, tmp_path):
    from tdm import teacher_ft
    from tdm.backbones import load_backbone

    model = tiny_models.save_pipeline(tiny_models.build(name), tmp_path / "model")
    cfg = config.parse(config.apply_overrides({}, [
        f"model.family={family}", f"model.pretrained={model}", f"teacher_ft.data={clips}", "teacher_ft.steps=1",
        "teacher_ft.batch_size=2", "teacher_ft.warmup_steps=0", "teacher_ft.lr=1e-2", "teacher_ft.eval_samples=0",
        "teacher_ft.ema_decay=0", "teacher_ft.snr_gamma=null", f"eval.weights_dir={tmp_path / 'w'}"]))
    teacher_ft.check_inputs(cfg)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "0.mp4").write_bytes(b"\0" * 64)
    (broken / "metadata.jsonl").write_text(json.dumps({"file_name": "0.mp4", "text": "x"}))
    bad_cfg = config.parse({**config.dump(cfg), "teacher_ft": {**config.dump(cfg)["teacher_ft"], "data": str(broken)}})
    with pytest.raises(ValueError, match=r"teacher_ft\.data: .*broken/0\.mp4: not a decodable video"):
        teacher_ft.check_inputs(bad_cfg)
    data = teacher_ft.open_training_set(cfg)
    assert isinstance(data, teacher_ft.VideoFolderTrainSet)
    before = load_backbone(model)
    data.fit(before)
    assert (data.num_frames, data.height, data.width) == (frames, 16, 16)
    videos, _ = data.batch(torch.tensor([0, 1]), torch.Generator().manual_seed(0))
    assert videos.shape == (2, 3, frames, 16, 16)
    assert tuple(before.encode_images(videos).shape[1:]) == tuple(before.sample_shape)
    metrics = teacher_ft.run(cfg, StagePaths.of("teacher_ft", tmp_path), progress=False)
    assert metrics["steps"] == 1 and np.isfinite(metrics["final_loss"]) and metrics["final_loss"] > 0
    after = load_backbone(tmp_path / "outputs/teacher_ft/model")
    params = dict(before.net.named_parameters())
    assert any(not torch.equal(p, params[n]) for n, p in after.net.named_parameters())
