import json
import shutil

import pytest
import torch

from tdm.data import (DIGIT_WORDS, ImageCaptionFolder, digit_prompt, digit_prompt_set, digits_split,
                      label_from_prompt, read_prompts)


def test_digits_split_is_fixed_stratified_and_scaled():
    train_x, train_y = digits_split("train")
    test_x, test_y = digits_split("test")
    assert train_x.shape == (1347, 1, 8, 8) and test_x.shape == (450, 1, 8, 8)
    assert train_x.min() == -1 and train_x.max() == 1
    assert torch.bincount(test_y).min() >= 43  # stratified: ~45 of every class held out
    again_x, _ = digits_split("test")
    assert torch.equal(test_x, again_x)
    with pytest.raises(ValueError):
        digits_split("val")


def test_prompts_name_their_digit():
    for label in range(10):
        for template in range(4):
            assert label_from_prompt(digit_prompt(label, template)) == label
    assert label_from_prompt("a cat") is None
    assert label_from_prompt("one or two") is None
    prompts = digit_prompt_set(20, seed=1)
    assert [label_from_prompt(p) for p in prompts] == [i % 10 for i in range(20)]
    assert len(set(prompts)) > 10  # templates vary
    assert DIGIT_WORDS[7] == "seven"


def test_read_prompts_formats(tmp_path):
    (tmp_path / "p.txt").write_text("a\n\nb\n")
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "a"}) + "\n" + json.dumps({"caption": "b"}) + "\n")
    (tmp_path / "p.csv").write_text("id,text\n1,a\n2,b\n")
    for name in ("p.txt", "p.jsonl", "p.csv"):
        assert read_prompts(tmp_path / name) == ["a", "b"]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"x": 1}))
    with pytest.raises(ValueError, match="'prompt', 'text' or 'caption'"):
        read_prompts(tmp_path / "bad.jsonl")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_prompts(tmp_path / "missing.txt")


def test_image_caption_folder_validates(tmp_path):
    from PIL import Image

    with pytest.raises(FileNotFoundError, match="metadata.jsonl"):
        ImageCaptionFolder.open(tmp_path)
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "x"}))
    with pytest.raises(FileNotFoundError, match="a.png"):
        ImageCaptionFolder.open(tmp_path)
    Image.new("RGB", (20, 10), (255, 0, 0)).save(tmp_path / "a.png")
    folder = ImageCaptionFolder.open(tmp_path)
    im = folder.load(0, 8)
    assert im.shape == (3, 8, 8) and im[0].min() == 1.0 and im[1].max() == -1.0
    assert folder.load(0, 8, channels=1).shape == (1, 8, 8)


def test_prompt_files_and_captions_with_a_byte_order_mark(tmp_path):
    """What spreadsheets and Notepad write: the same prompts as without the BOM; binary files refused by name."""
    from PIL import Image

    bom = "\ufeff"
    files = {"p.txt": "a handwritten digit one\na handwritten digit two\n",
             "p.csv": "prompt,seed\na handwritten digit one,0\na handwritten digit two,1\n",
             "p.jsonl": '{"prompt": "a handwritten digit one"}\n{"prompt": "a handwritten digit two"}\n'}
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
        (tmp_path / f"bom_{name}").write_text(bom + text, encoding="utf-8")
        assert read_prompts(tmp_path / f"bom_{name}") == read_prompts(tmp_path / name) == \
            ["a handwritten digit one", "a handwritten digit two"]
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(ValueError, match="bin.txt: not UTF-8"):
        read_prompts(tmp_path / "bin.txt")
    folder = tmp_path / "sft"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    (folder / "metadata.jsonl").write_text(bom + '{"file_name": "a.png", "text": "a cat"}\n', encoding="utf-8")
    assert ImageCaptionFolder.open(folder).captions == ["a cat"]


def test_check_sample_set_passes_what_tdm_sample_writes_and_names_what_it_refuses(tmp_path):
    """`tdm score` inputs checked from array headers before any metric loads (issue 18 case 14)."""
    import numpy as np

    from tdm.artifacts import save_samples
    from tdm.data import check_sample_set

    npz, png = save_samples(tmp_path / "s.npz", np.zeros((3, 8, 8, 1), np.uint8), ["a", "b", "c"])
    check_sample_set(npz)  # the format tdm writes
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(2):
        shutil.copy(png, folder / f"{i}.png")
    check_sample_set(folder)
    np.savez(tmp_path / "obj.npz", images=np.zeros((1, 8, 8, 1), np.uint8), prompts=np.array([None], dtype=object))
    (tmp_path / "text.npz").write_text("not a zip")
    for bad, why in [("obj.npz", "pickled"), ("text.npz", "not an npz"), ("s.png", "not an npz")]:
        with pytest.raises(ValueError, match=why) as err:
            check_sample_set(png if bad == "s.png" else tmp_path / bad)
        assert str(tmp_path) in str(err.value)
    with pytest.raises(FileNotFoundError):
        check_sample_set(tmp_path / "missing.npz")
