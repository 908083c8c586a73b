import json

import numpy as np
import pytest
import torch
from PIL import Image

from tdm import checkpoint as ckpt
from tdm import config
from conftest import PARAMS
from tdm.config import StagePaths
from tdm.data import digit_prompt, digits_split
from tdm.teacher_ft import min_snr_weight, run, train
from tdm.training import TrainingDiverged, lr_factor

TINY = ["model.channels=[32, 32]", "teacher_ft.batch_size=8", "teacher_ft.warmup_steps=2",
        "teacher_ft.eval_samples=0"]


def _cfg(tmp_path, *extra):
    return config.load(PARAMS, TINY + [f"eval.weights_dir={tmp_path / 'weights'}", *extra])


def _weights(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_loss_goes_down(tmp_path):
    cfg = _cfg(tmp_path, "teacher_ft.steps=60", "teacher_ft.batch_size=32", "teacher_ft.lr=3e-3")
    train(cfg, StagePaths.of("teacher_ft", tmp_path), progress=False)
    rows = [json.loads(ln) for ln in (tmp_path / "outputs/teacher_ft/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 61)) and {"loss", "lr", "grad_norm"} <= rows[0].keys()
    loss = np.array([r["loss"] for r in rows])
    assert loss[-15:].mean() < 0.7 * loss[:15].mean()


def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path):
    cfg = _cfg(tmp_path, "teacher_ft.steps=6", "teacher_ft.checkpoint_every=3")
    _, ema_a, res_a = train(cfg, StagePaths.of("teacher_ft", tmp_path / "a"), progress=False)
    paths_b = StagePaths.of("teacher_ft", tmp_path / "b")
    train(cfg, paths_b, progress=False, stop_after=3)
    assert [p.name for p in ckpt.list_checkpoints(paths_b.out_dir / "checkpoints")] == ["step-0000003"]
    backbone_b, ema_b, res_b = train(cfg, paths_b, progress=False)
    assert res_b.resumed_from == 3 and res_a.resumed_from is None
    for k, v in ema_a.shadow.items():
        assert torch.equal(v, ema_b.shadow[k]), k
    assert res_a.final_loss == res_b.final_loss
    log_a = (tmp_path / "a/outputs/teacher_ft/metrics.jsonl").read_text()
    assert log_a == (paths_b.out_dir / "metrics.jsonl").read_text()  # the log continues across the resume
    assert [json.loads(ln)["step"] for ln in log_a.splitlines()] == [1, 2, 3, 4, 5, 6]


def test_changed_params_start_afresh(tmp_path):
    paths = StagePaths.of("teacher_ft", tmp_path)
    train(_cfg(tmp_path, "teacher_ft.steps=2", "teacher_ft.checkpoint_every=1"), paths, progress=False)
    _, _, res = train(_cfg(tmp_path, "teacher_ft.steps=2", "teacher_ft.lr=1e-4"), paths, progress=False)
    assert res.resumed_from is None


def test_divergence_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = _cfg(tmp_path, "teacher_ft.steps=50", "teacher_ft.checkpoint_every=1", "teacher_ft.lr=1e12",
               "teacher_ft.warmup_steps=0", "teacher_ft.grad_clip=1e30")
    paths = StagePaths.of("teacher_ft", tmp_path)
    with pytest.raises(TrainingDiverged, match="NaN|Inf|nan|inf"):
        train(cfg, paths, progress=False)
    kept = ckpt.list_checkpoints(paths.out_dir / "checkpoints")
    assert kept, "the steps before the blow-up should have left a checkpoint"
    for c in kept:
        state = ckpt.load_state(c)
        assert all(torch.isfinite(v).all() for v in state["trainer"]["net"].values())


def test_stage_writes_teacher_metrics_and_samples(tmp_path):
    cfg = _cfg(tmp_path, "teacher_ft.steps=3", "teacher_ft.eval_samples=20", "sample.steps=2")
    paths = StagePaths.of("teacher_ft", tmp_path)
    metrics = run(cfg, paths, progress=False)
    saved = json.loads(paths.metrics.read_text())
    assert saved == json.loads(json.dumps(metrics))
    assert saved["steps"] == 3 and saved["eval_n"] == 20 and np.isfinite(saved["eval_fid"])
    assert 0 <= saved["eval_accuracy"] <= 1
    assert (paths.out_dir / "model" / "model_index.json").is_file()
    assert (paths.out_dir / "samples.npz").is_file() and (paths.out_dir / "samples.png").is_file()
    params = json.loads((paths.out_dir / "model" / "tdm_params.json").read_text())
    assert params["teacher_ft"]["steps"] == 3


def test_fine_tunes_a_pretrained_model_on_an_image_caption_folder(tmp_path, tiny_digits):
    images, labels = digits_split("test")
    folder = tmp_path / "captioned"
    folder.mkdir()
    rows = []
    for i in range(12):
        name = f"{i}.png"
        Image.fromarray(((images[i, 0].numpy() + 1) * 127.5).astype(np.uint8)).resize((16, 16)).save(folder / name)
        rows.append(json.dumps({"file_name": name, "text": digit_prompt(int(labels[i]))}))
    (folder / "metadata.jsonl").write_text("\n".join(rows))
    tiny_digits.save(tmp_path / "pretrained")
    cfg = _cfg(tmp_path, f"model.pretrained={tmp_path / 'pretrained'}", f"teacher_ft.data={folder}",
               "teacher_ft.steps=2")
    backbone, _, res = train(cfg, StagePaths.of("teacher_ft", tmp_path), progress=False)
    assert res.steps == 2 and np.isfinite(res.final_loss)
    moved = any(not torch.equal(a, b) for a, b in zip(backbone.net.parameters(), tiny_digits.net.parameters()))
    assert moved


def test_schedules_and_weights():
    assert lr_factor(0, 10, 100, "cosine") == pytest.approx(0.1)
    assert lr_factor(10, 10, 100, "cosine") == pytest.approx(1.0)
    assert lr_factor(100, 10, 100, "cosine") == pytest.approx(0.0)
    assert lr_factor(50, 10, 100, "constant") == 1.0
    snr = torch.tensor([0.1, 5.0, 100.0])
    torch.testing.assert_close(min_snr_weight(snr, 5.0, "epsilon"), torch.tensor([1.0, 1.0, 0.05]))
    torch.testing.assert_close(min_snr_weight(snr, None, "epsilon"), torch.ones(3))
