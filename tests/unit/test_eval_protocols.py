"""The published evaluation protocols (tdm.evaluation.protocols) on tiny files in their real layouts, the teacher's
NFE curve, captioned grids, and `tdm evaluate` + the report end to end on a tiny digits teacher."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import PARAMS
from PIL import Image

from tdm.cli import main
from tdm.evaluation import protocols
from tdm.evaluation.grids import captioned_grid

STYLE_PROMPTS = {"anime": ["A cute anime girl with a red scarf.", "Two samurai cats in the rain."],
                 "concept-art": ["A castle floating above the clouds.", "A robot garden at dusk."],
                 "paintings": ["An oil painting of a quiet harbour.", "Sunflowers in a blue vase."],
                 "photo": ["A dog on a skateboard.", "A bowl of ramen on a wooden table."]}


def write_hpsv2_benchmark(folder):
    """The HPSv2 benchmark's prompt folder: <style>.json, each a JSON list of prompt strings."""
    folder.mkdir(parents=True, exist_ok=True)
    for style, prompts in STYLE_PROMPTS.items():
        (folder / f"{style}.json").write_text(json.dumps(prompts))
    return folder


def write_coco(root, n_images=6):
    """captions_val2014.json (images [{id, file_name, ...}], annotations [{image_id, id, caption}]) and val2014/
    with the images, non-square (the protocol centre-crops)."""
    images_dir = root / "val2014"
    images_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images, annotations = [], []
    ids = [42, 73, 74, 133, 136, 139, 164, 192][:n_images]
    for k, image_id in enumerate(ids):
        name = f"COCO_val2014_{image_id:012d}.jpg"
        h, w = (40, 56) if k % 2 else (60, 44)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(images_dir / name, quality=95)
        images.append({"license": 1, "file_name": name, "coco_url": "", "height": h, "width": w, "id": image_id})
        for j in range(3):
            annotations.append({"image_id": image_id, "id": 1000 + 10 * k + j,
                                "caption": f"image {image_id} caption {j} of a scene"})
    (root / "annotations").mkdir()
    captions = root / "annotations" / "captions_val2014.json"
    captions.write_text(json.dumps({"info": {}, "licenses": [], "images": images, "annotations": annotations}))
    return captions, images_dir


# --- the layouts ---------------------------------------------------------------------------------

def test_hpsv2_benchmark_layout(tmp_path):
    folder = write_hpsv2_benchmark(tmp_path / "benchmark")
    p = protocols.read_hpsv2_benchmark(folder, hps_version="v2")
    assert (p.name, p.version, p.n) == ("hpsv2", "v2", 8)
    assert list(p.groups) == ["anime", "concept-art", "paintings", "photo"]
    assert [p.prompts[i] for i in p.groups["paintings"]] == STYLE_PROMPTS["paintings"]
    assert protocols.read_hpsv2_benchmark(folder, per_style=1).groups["photo"] == (3,)
    (folder / "photo.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"evaluate.protocol_path: .* lacks photo.json"):
        protocols.read_hpsv2_benchmark(folder)
    (folder / "photo.json").write_text('{"not": "a list"}')
    with pytest.raises(ValueError, match="photo.json: expected a non-empty JSON list"):
        protocols.read_hpsv2_benchmark(folder)


def test_hpsv2_style_score_is_the_mean_of_80_prompt_chunks():
    scores = np.arange(100, dtype=float)
    assert protocols.hpsv2_group_score(scores) == pytest.approx((np.mean(scores[:80]) + np.mean(scores[80:])) / 2)
    assert protocols.hpsv2_group_score(scores[:80]) == pytest.approx(scores[:80].mean())


def test_coco_draw_is_seeded_and_references_match_by_image_id(tmp_path):
    captions, images_dir = write_coco(tmp_path)
    files, by_id = protocols.read_coco_captions(captions)
    a = protocols.coco_draw(by_id, 4, seed=0)
    assert a == protocols.coco_draw(by_id, 4, seed=0)  # same seed, same captions
    assert a != protocols.coco_draw(by_id, 4, seed=1)
    assert len({i for i, _ in a}) == 4  # one caption per image
    assert all(caption in by_id[i] for i, caption in a)
    p = protocols.read_coco2014(captions, images_dir, 4, seed=0, resolution=32)
    assert p.prompts == tuple(c for _, c in a) and p.image_ids == tuple(i for i, _ in a)
    for image_id, caption, f in zip(p.image_ids, p.prompts, p.reference_files):
        assert f.name == files[image_id] and caption.startswith(f"image {image_id} ")
    # Centre crop to the short side, then Lanczos: a 40 x 56 image keeps its middle 40 x 40.
    with Image.open(p.reference_files[0]) as im:
        arr = np.asarray(im.convert("RGB"))
    h, w = arr.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    np.testing.assert_array_equal(protocols.center_crop_resize(arr, side), arr[top:top + side, left:left + side])
    assert protocols.center_crop_resize(arr, 32).shape == (32, 32, 3)
    ref = protocols.reference_folder(p, tmp_path / "cache")
    written = sorted(ref.glob("*.png"))
    assert [int(f.stem.split("_")[1]) for f in written] == list(p.image_ids)
    with Image.open(written[0]) as im, Image.open(p.reference_files[0]) as orig:
        np.testing.assert_array_equal(np.asarray(im), protocols.center_crop_resize(orig, 32))
    assert protocols.reference_folder(p, tmp_path / "cache") == ref  # built once
    with pytest.raises(ValueError, match="evaluate.n: 7 captions asked for, but only 6 images"):
        protocols.read_coco2014(captions, images_dir, 7, seed=0)
    (images_dir / files[p.image_ids[1]]).unlink()
    with pytest.raises(FileNotFoundError, match=f"evaluate.coco_images: image {p.image_ids[1]}"):
        protocols.read_coco2014(captions, images_dir, 4, seed=0)
    captions.write_text(json.dumps({"images": [{"id": 1}]}))
    with pytest.raises(ValueError, match="captions_val2014.json layout"):
        protocols.read_coco_captions(captions)


def test_vbench_suite_and_scores(tmp_path):
    info = [{"prompt_en": "a dog running", "dimension": ["subject_consistency"]},
            {"prompt_en": "a red car", "dimension": ["color"]}]
    (tmp_path / "VBench_full_info.json").write_text(json.dumps(info))
    p = protocols.read_vbench_suite(tmp_path)
    assert p.prompts == ("a dog running", "a red car") and p.version == "VBench_full_info.json"
    (tmp_path / "all.txt").write_text("a\n\nb\nc\n")
    assert protocols.read_vbench_suite(tmp_path / "all.txt", n=2).prompts == ("a", "b")
    quality = {d: protocols.VBENCH_RANGE.get(d, (0, 1))[1] for d in protocols.VBENCH_QUALITY}  # each at its max
    s = protocols.vbench_scores(quality)
    assert s["vbench_quality"] == pytest.approx(1.0) and s["vbench_semantic"] is None and s["vbench_total"] is None
    dims = {**quality, "temporal_flickering": 0.6293, **{d: 0.5 for d in protocols.VBENCH_SEMANTIC}}
    s = protocols.vbench_scores(dims)
    # temporal_flickering at its range minimum normalises to 0: (5 x 1 + 0.5 x 1 + 0) / 6.5.
    assert s["vbench_quality"] == pytest.approx(5.5 / 6.5)
    sem = np.mean([(0.5 - protocols.VBENCH_RANGE.get(d, (0, 1))[0])
                   / (protocols.VBENCH_RANGE.get(d, (0, 1))[1] - protocols.VBENCH_RANGE.get(d, (0, 1))[0])
                   for d in protocols.VBENCH_SEMANTIC])
    assert s["vbench_semantic"] == pytest.approx(sem)
    assert s["vbench_total"] == pytest.approx((4 * 5.5 / 6.5 + sem) / 5)


def test_captioned_grid_upscales_separates_and_captions():
    images = np.zeros((5, 8, 8, 1), np.uint8) + 200
    grid = np.asarray(captioned_grid(images, ["a handwritten digit three"] * 4 + [""], cell=64, gutter=5))
    # 3 columns of 64 px cells (8 px upscaled x 8, nearest) with 5 px gutters.
    assert grid.shape[1] == 5 + 3 * (64 + 5)
    cell = grid[5:69, 5:69]
    assert (cell == 200).all()  # nearest upscaling: flat stays flat
    assert (grid[:, 69:74] == 255).all()  # the gutter between columns
    caption_band = grid[69:69 + 18, 5:69]
    assert (caption_band < 128).any()  # text under the cell
    video = np.zeros((2, 6, 8, 8, 3), np.uint8)
    assert captioned_grid(video, ["a", "b"]).size[0] > captioned_grid(video[:, 0], ["a", "b"]).size[0]
    with pytest.raises(ValueError, match="prompts for"):
        captioned_grid(images, ["x"])


# --- end to end: tdm evaluate + the report --------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_metric_weights(tmp_path_factory):
    """Tiny HPS and open_clip weights (cheap); the Inception the coco2014 FID needs is `with_inception`."""
    from eval_tiny_weights import register_tiny_clip, write_hps, write_open_clip

    folder = tmp_path_factory.mktemp("protocol_weights")
    register_tiny_clip(folder)
    write_hps(folder)
    write_open_clip(folder, "laion")
    return folder


@pytest.fixture(scope="module")
def with_inception(tiny_metric_weights):
    """The same folder plus torch-fidelity's Inception (full-size by format: the costly one, built only for the
    test that scores FID)."""
    from eval_tiny_weights import write_inception

    write_inception(tiny_metric_weights)
    return tiny_metric_weights


@pytest.fixture
def project(tmp_path, monkeypatch, teacher_dir):
    shutil.copy(PARAMS, tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _evaluate(teacher_dir, weights, *extra):
    sets = [f"evaluate.teacher={teacher_dir}", "evaluate.student=null", "evaluate.lora_manifest=null",
            f"eval.weights_dir={weights}", "sample.batch_size=8", *extra]
    return main(["evaluate", "-q"] + [a for s in sets for a in ("-S", s)])


def test_hpsv2_protocol_end_to_end_with_the_teacher_curve_and_the_report(project, teacher_dir, tiny_metric_weights,
                                                                        monkeypatch):
    from eval_tiny_weights import TINY_ARCH

    from tdm import report
    from tdm.evaluation.hps import HPS

    monkeypatch.setattr("tdm.evaluation.hps.ARCH", TINY_ARCH)  # the tiny stand-in for ViT-H-14
    bench = write_hpsv2_benchmark(project / "hpsv2_benchmark")
    assert _evaluate(teacher_dir, tiny_metric_weights, "evaluate.protocol=hpsv2",
                     f"evaluate.protocol_path={bench}", "evaluate.teacher_curve=[2, 1]",
                     "evaluate.teacher_steps=2") == 0  # teacher_steps joins the curve (here already on it)
    result = json.loads((project / "metrics/evaluate.json").read_text())
    rows = result["rows"]
    assert [(r["steps"], r["nfe"], r["group"]) for r in rows] == [
        (s, 2 * s, g) for s in (1, 2) for g in ("anime", "concept-art", "paintings", "photo", "average")]
    for r in rows:
        assert (r["protocol"], r["protocol_version"], r["resolution"]) == ("hpsv2", "v2.1", "8x8")
        assert r["metric_model"] == f"HPS v2.1 (open_clip {TINY_ARCH})"
        assert r["n"] == (8 if r["group"] == "average" else 2) and set(r["metrics"]) == {"hps"}
    assert result["protocol"]["groups"] == {s: 2 for s in STYLE_PROMPTS}
    # Per-style = that style's images scored with HPS; average = over all eight (hpsv2/evaluation.py).
    with np.load(project / rows[0]["samples"]) as z:
        images, prompts = z["images"], [str(p) for p in z["prompts"]]
    assert prompts == [p for ps in STYLE_PROMPTS.values() for p in ps]
    scores = HPS(tiny_metric_weights, arch=TINY_ARCH).scores(images, prompts)
    assert rows[0]["metrics"]["hps"] == pytest.approx(scores[:2].mean(), rel=1e-5)
    assert rows[4]["metrics"]["hps"] == pytest.approx(scores.mean(), rel=1e-5)
    assert rows[0]["metrics"]["hps"] != rows[5]["metrics"]["hps"]  # 1 step vs 2 steps
    table = (project / "outputs/evaluate/table.md").read_text()
    assert "| teacher | 1 | 2 | 1.5 | 2 | hpsv2 (v2.1) | anime |" in table
    assert "Protocol hpsv2 (v2.1): n=8, resolution 8x8, metric model HPS v2.1" in table
    grid = Image.open(project / rows[0]["grid"])
    assert grid.size[0] >= 3 * 192  # 3 columns of upscaled cells with captions
    # The report shows the per-style rows, the protocol and the teacher's HPS-vs-NFE curve.
    out = report.run(root=project)
    page = (project / "outputs/report/index.html").read_text()
    assert "<td>hpsv2 (v2.1)</td><td>paintings</td>" in page and "HPS v2.1 (open_clip" in page
    assert (project / "outputs/report/hps_vs_nfe.png").is_file()
    md = (project / out["markdown"]).read_text() if not out["markdown"].startswith("/") else open(out["markdown"]).read()
    assert "| protocol | version | n | resolution | metric model |" in md
    assert page.count("class='grid'") == 2  # one grid per sample set, not per style row


def test_coco2014_protocol_end_to_end(project, teacher_dir, with_inception):
    from eval_tiny_weights import TINY_ARCH

    captions, images_dir = write_coco(project / "coco")
    args = ["evaluate.protocol=coco2014", f"evaluate.protocol_path={captions}", f"evaluate.coco_images={images_dir}",
            "evaluate.n=3", "evaluate.teacher_steps=1", f"eval.clip_model={TINY_ARCH}:laion"]
    assert _evaluate(teacher_dir, with_inception, *args, "sample.seed=5") == 0
    result = json.loads((project / "metrics/evaluate.json").read_text())
    (row,) = result["rows"]
    assert (row["protocol"], row["protocol_version"], row["n"], row["resolution"], row["seed"]) == (
        "coco2014", "val2014", 3, "256x256", 5)
    assert row["metric_model"] == f"Inception-v3 pool3 (torch-fidelity 2015-12-05); CLIP {TINY_ARCH}:laion"
    assert set(row["metrics"]) == {"fid", "clip_score"} and row["metrics"]["fid"] > 0
    _, by_id = protocols.read_coco_captions(captions)
    draw = protocols.coco_draw(by_id, 3, seed=5)
    assert result["protocol"]["image_ids"] == [i for i, _ in draw]
    with np.load(project / row["samples"]) as z:
        assert [str(p) for p in z["prompts"]] == [c for _, c in draw]  # each sample captioned as its reference
    ref = sorted(p.name for p in (project / row["reference"]).glob("*.png"))
    assert [int(n.split("_")[1].split(".")[0]) for n in ref] == [i for i, _ in draw]
    # Another seed draws other captions (and their references); CLIP only, the draw is what is under test.
    assert _evaluate(teacher_dir, with_inception, *args, "sample.seed=6", "evaluate.metrics=[clip]") == 0
    other = json.loads((project / "metrics/evaluate.json").read_text())
    assert other["protocol"]["image_ids"] != result["protocol"]["image_ids"]
    assert other["protocol"]["image_ids"] == [i for i, _ in protocols.coco_draw(by_id, 3, seed=6)]
    (row6,) = other["rows"]
    ref6 = sorted(int(p.stem.split("_")[1]) for p in (project / row6["reference"]).glob("*.png"))
    assert ref6 == sorted(other["protocol"]["image_ids"])


def test_protocol_inputs_fail_before_sampling_naming_the_key(project, teacher_dir, tiny_metric_weights, capsys):
    bench = write_hpsv2_benchmark(project / "b")
    (bench / "anime.json").write_text("[]")
    assert _evaluate(teacher_dir, tiny_metric_weights, "evaluate.protocol=hpsv2", f"evaluate.protocol_path={bench}") == 2
    assert "evaluate.protocol_path" in capsys.readouterr().err
    captions, _ = write_coco(project / "coco")
    assert _evaluate(teacher_dir, tiny_metric_weights, "evaluate.protocol=coco2014",
                     f"evaluate.protocol_path={captions}", "evaluate.n=4") == 2
    assert "evaluate.coco_images: required" in capsys.readouterr().err
    assert not (project / "metrics").exists() and not (project / "outputs/evaluate").exists()
