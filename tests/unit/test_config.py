import re

import pytest

from tdm import config
from conftest import PARAMS
from tdm.config import ConfigError


def test_committed_params_are_valid():
    cfg = config.load(PARAMS)
    assert cfg.model.family == "digits"
    assert cfg.teacher_ft.steps >= 1


@pytest.mark.parametrize("override, key", [
    ("teacher_ft.lr=0", "teacher_ft.lr"),
    ("teacher_ft.lr=-1e-3", "teacher_ft.lr"),
    ("teacher_ft.steps=abc", "teacher_ft.steps"),
    ("teacher_ft.steps=0", "teacher_ft.steps"),
    ("teacher_ft.cfg_dropout=1.5", "teacher_ft.cfg_dropout"),
    ("teacher_ft.typo=1", "teacher_ft.typo"),
    ("sample.guidance=0.5", "sample.guidance"),
    ("teacher_ft.data=/no/such/folder", "teacher_ft.data"),
    ("model.pretrained=./no/such/model", "model.pretrained"),
    ("model.channels=[36, 64]", "model.channels"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        config.load(PARAMS, [override])
    assert str(err.value).startswith(f"{PARAMS}: {key}: ")


def test_overrides_parse_values_as_yaml_like_dvc():
    cfg = config.load(PARAMS, ["teacher_ft.lr=1e-4", "teacher_ft.snr_gamma=null", "sample.steps=4",
                                      "model.channels=[32, 64]"])
    assert cfg.teacher_ft.lr == pytest.approx(1e-4)
    assert cfg.teacher_ft.snr_gamma is None
    assert cfg.sample.steps == 4
    assert cfg.model.channels == (32, 64)


@pytest.mark.parametrize("bad", ["teacher_ft.lr", "teacher_ft=3", "nosuch.key=1", "a.b.c=1"])
def test_malformed_overrides(bad):
    with pytest.raises(ConfigError):
        config.load(PARAMS, [bad])


def test_unknown_section_and_missing_file(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("distil:\n  k: 4\n")
    with pytest.raises(ConfigError, match="distil: unknown key"):
        config.load(p)
    with pytest.raises(ConfigError, match="not found"):
        config.load(tmp_path / "missing.yaml")
    p.write_text("teacher_ft: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(p)


def test_image_caption_folder_accepted(tmp_path):
    (tmp_path / "metadata.jsonl").write_text("")
    with pytest.raises(ConfigError, match="teacher_ft.data: .*no rows"):
        config.load(PARAMS, [f"teacher_ft.data={tmp_path}"])
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "a"}\n')
    cfg = config.load(PARAMS, [f"teacher_ft.data={tmp_path}"])
    assert cfg.teacher_ft.data == str(tmp_path)


def test_dump_round_trips():
    cfg = config.load(PARAMS)
    assert config.parse(config.dump(cfg)) == cfg


def test_params_read_as_yaml_1_2_like_dvc(tmp_path):
    # `dvc exp run -S` rewrites params.yaml and drops the quotes around "no": it must still mean "no".
    text = PARAMS.read_text().replace('mixed_precision: "no"', "mixed_precision: no")
    assert "mixed_precision: no " in text
    (tmp_path / "params.yaml").write_text(text)
    cfg = config.load(tmp_path / "params.yaml", ["distill.unify=true", "teacher_ft.mixed_precision=no"])
    assert cfg.teacher_ft.mixed_precision == "no" and cfg.distill.mixed_precision == "no"
    assert cfg.distill.unify is True


@pytest.mark.parametrize("override", ["distill.lr=inf", "distill.fake_lr=.inf", "distill.guidance=Infinity",
                                      "distill.huber_c=inf", "distill.snr_clamp=.inf", "distill.shift=inf",
                                      "teacher_ft.lr=inf", "teacher_ft.grad_clip=.inf", "lora_transfer.scale=inf",
                                      "sample.guidance=-inf", "distill.lr=nan"])
def test_infinite_values_are_refused_naming_the_key(override):
    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
        config.load(PARAMS, [override])


@pytest.mark.parametrize("text, key", [
    ("distill:\n  k: 4\n  iterations: 400\n  k: 1\n", "distill.k"),
    ("distill:\n  k: 4\nsample:\n  steps: 2\ndistill:\n  k: 1\n", "distill"),
    ("lora_transfer:\n  custom_models: [digits:thick]\n  scale: 1\n  scale: 2\n", "lora_transfer.scale"),
])
def test_duplicate_keys_are_refused_as_dvc_refuses_them(tmp_path, text, key):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"duplicate key {re.escape(key)} \(line"):
        config.load(path)


def test_params_with_a_byte_order_mark_or_not_text(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + b"distill:\n  k: 2\n")
    assert config.load(path).distill.k == 2
    path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(ConfigError, match="not UTF-8"):
        config.load(path)


# -- issue 18 case 14: malformed params fail in one line naming the file or the key, before any model loads ---------
@pytest.mark.parametrize("text, named", [
    ("- model\n- distill\n", "expected a mapping of sections"),  # a YAML list (was a traceback)
    ("42\n", "expected a mapping of sections"),
    ("just a string\n", "expected a mapping of sections"),
    ("distill:\n  ? [1, 2]\n  : 3\n", "not valid YAML: found unhashable key (line 2"),  # was a TypeError
    ("distill: [1, 2\n", "not valid YAML: expected ',' or ']'"),
])
def test_params_that_are_not_a_mapping_of_sections_name_the_file(tmp_path, text, named):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        config.load(path)
    assert str(err.value).startswith(f"{path}: ") and named in str(err.value)
    assert "\n" not in str(err.value)  # one line, not PyYAML's multi-line report


def test_params_with_many_aliases_load_in_linear_time(tmp_path):
    """A billion-laughs file: the duplicate-key walk visits each shared node once."""
    lines = ["a0: &a0 [x]"] + [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]" for i in range(1, 30)]
    (tmp_path / "p.yaml").write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match="a0: unknown key"):
        config.load(tmp_path / "p.yaml")


@pytest.mark.parametrize("key", ["teacher_ft.seed", "distill.seed", "lora_transfer.seed", "sample.seed"])
@pytest.mark.parametrize("value", ["-1", str(2**70), "1.5", "abc"])
def test_every_seed_is_a_non_negative_63_bit_integer(key, value):
    with pytest.raises(ConfigError) as err:
        config.load(PARAMS, [f"{key}={value}"])
    assert str(err.value).startswith(f"{PARAMS}: {key}: ")
    assert config.load(PARAMS, [f"{key}={2**63 - 1}"])  # the largest torch and numpy both take


@pytest.mark.parametrize("section", ["distill", "lora_transfer", "evaluate"])
@pytest.mark.parametrize("name, data, why", [
    ("empty.txt", b"", "no prompts"),
    ("blank.txt", b"\n  \n", "no prompts"),
    ("bin.txt", b"\x00\xff\xfe\x80", "not UTF-8 text"),
    ("torn.jsonl", b'{"prompt": "a"}\n{"prompt"\n', "not valid JSON"),
    ("nofield.csv", b"title\nx\n", "needs a 'prompt'"),
])
def test_prompt_files_are_read_when_params_are_validated(tmp_path, section, name, data, why):
    """An empty, binary or malformed prompt file fails with the params, not after the teacher has loaded."""
    (tmp_path / name).write_bytes(data)
    with pytest.raises(ConfigError) as err:
        config.load(PARAMS, [f"{section}.prompts={tmp_path / name}"])
    assert str(err.value).startswith(f"{PARAMS}: {section}.prompts: {tmp_path / name}") and why in str(err.value)


def test_override_values_that_are_not_yaml_name_the_override():
    with pytest.raises(ConfigError, match=r"override 'distill.k=\[1': distill.k: value is not valid YAML"):
        config.load(PARAMS, ["distill.k=[1"])
